#!/usr/bin/env python
"""Time the web page in a real browser, and (optionally) take the screenshots in docs/.

    python benchmarks/page_browser.py --model models/bottle-padim.safetensors \\
        --image ../shared/data/mvtec_ad/bottle/test/broken_large/000.png --repeat 10 \\
        --screenshots docs --gallery ../shared/data/mvtec_ad/bottle/test/*/00[0-2].png

Starts ``insightad serve``'s app on 127.0.0.1 (uvicorn in a thread), opens ``/`` in Debian's
chromium through Playwright, and uploads ``--image`` ``--repeat`` times, one after the other. The
page's own timer (``performance.now()`` from the moment it builds the request until the image and
its server-rendered heatmap are both decoded in the browser) is read from each result card. The
same request straight to the API (httpx, no browser) is timed too, so the browser's share shows.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image
from playwright.sync_api import sync_playwright

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.cli.serve import bind


def serve(model: str) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(model, ServeParams()), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return url, server, thread


def upload_and_wait(page, files: list[str]) -> None:
    before = page.locator(".card").count()
    page.set_input_files("#file-input", files)
    page.wait_for_function(f"() => document.querySelectorAll('.card').length >= {before + len(files)} && "
                           "[...document.querySelectorAll('.card')].every(c => c.dataset.ms || "
                           "c.classList.contains('failed'))", timeout=120_000)


def api_ms(url: str, image: str, repeat: int) -> list[float]:
    out = []
    data = Path(image).read_bytes()
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/infer", files={"file": (Path(image).name, data)},
                       data={"heatmap": "true"}, timeout=120)
        r.raise_for_status()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(xs: list[float]) -> dict:
    return {"median_ms": round(statistics.median(xs), 1), "min_ms": round(min(xs), 1), "max_ms": round(max(xs), 1),
            "n": len(xs)}


def shrink(path: Path) -> None:
    """256-colour PNG: a third of the size, still readable (the screenshots live in git)."""
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def screenshots(page, out: Path, gallery: list[str]) -> list[str]:
    page.click("#clear")
    upload_and_wait(page, gallery)
    page.evaluate("() => window.scrollTo(0, 0)")
    shots = []
    page.screenshot(path=str(out / "page-inspect.png"))
    shots.append("page-inspect.png")
    page.click(".tab[data-view=threshold]")
    scores = sorted(float(s) for s in page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.score)") if s)
    mid = scores[len(scores) // 2 - 1] if len(scores) > 2 else scores[0]
    page.eval_on_selector("#thr-slider", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          mid + 1e-3)
    page.screenshot(path=str(out / "page-threshold.png"))
    shots.append("page-threshold.png")
    page.click(".tab[data-view=review]")
    for key in ("d", "j", "d", "j", "d", "j", "d"):
        page.keyboard.press(key)
    page.screenshot(path=str(out / "page-review.png"))
    shots.append("page-review.png")
    return shots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True, help="the image to time")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--screenshots", metavar="DIR", help="also write page-{inspect,threshold,review}.png here")
    ap.add_argument("--gallery", nargs="*", default=[], help="images shown in the screenshots")
    args = ap.parse_args()
    url, server, thread = serve(args.model)
    try:
        api_ms(url, args.image, 2)  # warm
        api = api_ms(url, args.image, args.repeat)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready]", state="attached")
            upload_and_wait(page, [args.image])  # warm the page too
            for _ in range(args.repeat):
                upload_and_wait(page, [args.image])
            ms = [float(m) for m in page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.ms)")][:-1]
            shots = screenshots(page, Path(args.screenshots), args.gallery) if args.screenshots else []
            for name in shots:
                shrink(Path(args.screenshots) / name)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(20)
    w, h = Image.open(args.image).size
    print(json.dumps({"image": args.image, "size": [w, h], "page_score_and_show": summary(ms),
                      "api_only_with_color_heatmap": summary(api), "cpus": len(os.sched_getaffinity(0)),
                      "load_avg_1min": os.getloadavg()[0], "screenshots": shots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
