"""The operators' web page in a real browser: Playwright driving Debian's chromium against uvicorn on 127.0.0.1.

Never `playwright install` (it downloads a browser): .ci/run installs the `chromium` apt package.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from insightad.apps.serve.settings import ServeParams
from insightad.cli import main as cli_main
from insightad.data.synthetic import make_image
from tests.mapdetector import NAME as METHOD
from tests.mapdetector import register_meandev

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser")
                             or "") if p and Path(p).is_file()), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); "
                                                         "these tests never download a browser")
KEY = "line-7-secret"
TIMEOUT_MS = 20_000


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def map_model(mvtec_dir, tmp_path_factory) -> Path:
    """A tiny detector with maps (tests/mapdetector.py: no backbone, so it trains in a second); the page
    treats every method alike, and the served scores are compared with the API's, not with a number."""
    from insightad.apps.train import train_model
    from insightad.config import DataParams

    register_meandev()
    out = tmp_path_factory.mktemp("page-model") / "meandev.safetensors"
    train_model(mvtec_dir, METHOD, {"image_size": 64}, DataParams(), out, progress=False)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("page-images")
    out = {}
    for name, defect, seed in (("good_1", None, 71), ("good_2", None, 72), ("blob_1", "blob", 73),
                               ("scratch_1", "scratch", 74)):
        img, _ = make_image("disc", defect, size=96, seed=seed)
        out[name] = root / f"{name}.png"
        img.save(out[name])
    (root / "other").mkdir()
    out["same_name"] = root / "other" / "good_1.png"  # another image with a name already used
    make_image("disc", "blob", size=96, seed=75)[0].save(out["same_name"])
    out["corrupt"] = root / "corrupt.png"
    out["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    return out


@contextmanager
def running(app):
    """uvicorn in a thread on a free loopback port; yields the base URL."""
    from insightad.cli.serve import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def server(map_model):
    from insightad.apps.serve import create_app

    with running(create_app(map_model, ServeParams())) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(map_model):
    from insightad.apps.serve import create_app

    with running(create_app(map_model, ServeParams(api_key=KEY))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])  # a test-pattern camera
        yield b
        b.close()


class Recorder:
    """Every request the page makes, and every script error it raises."""

    def __init__(self, page) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.blocked: set[str] = set()  # stopped inside the browser by the server's Content-Security-Policy
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("requestfailed", lambda r: self.blocked.add(r.url) if "csp" in (r.failure or "").lower() else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def foreign(self) -> list[str]:
        return [u for u in self.urls if urlsplit(u).scheme not in ("data", "blob")
                and urlsplit(u).hostname != "127.0.0.1"]


@pytest.fixture
def page(browser):
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield pg
    ctx.close()


def wait_for_model(page) -> None:
    page.wait_for_selector("body[data-ready]", state="attached")
    assert METHOD in page.inner_text("#model-summary")


def open_page(page, url: str) -> Recorder:
    rec = Recorder(page)
    page.goto(url + "/")
    wait_for_model(page)
    return rec


def upload(page, files: list[Path]) -> None:
    before = page.locator(".card").count()
    page.set_input_files("#file-input", [str(f) for f in files])
    page.wait_for_function(f"() => document.querySelectorAll('.card').length >= {before + len(files)} && "
                           "[...document.querySelectorAll('.card')].every(c => c.dataset.score || "
                           "c.classList.contains('failed'))")


def api_score(url: str, path: Path, key: str | None = None) -> dict:
    headers = {"X-API-Key": key} if key else {}
    with path.open("rb") as f:
        return httpx.post(f"{url}/infer", files={"file": (path.name, f, "image/png")}, headers=headers,
                          timeout=30).json()


def card(page, name: str):
    return page.locator(".card", has=page.locator(".name", has_text=name)).first


def set_slider(page, value: float) -> None:
    page.eval_on_selector("#thr-slider", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          value)


# ------------------------------------------------------------------------------ tests
def test_page_loads_with_no_request_leaving_loopback(page, server):
    rec = open_page(page, server)
    page.wait_for_function("() => document.getElementById('colorbar').naturalWidth > 0")  # the map's colour bar
    page.click(".tab[data-view=model]")
    page.wait_for_selector("#health-info dt")
    assert "ok" in page.inner_text("#health-info")
    info = page.inner_text("#model-info")
    sha = httpx.get(f"{server}/model").json()["model_sha256"]
    assert METHOD in info and "64 × 64" in info and sha in info and "train_p99" in info
    assert rec.urls and not rec.foreign(), rec.foreign()
    assert not rec.errors, rec.errors


def test_upload_shows_the_api_score_heatmap_and_a_readable_error(page, server, images):
    rec = open_page(page, server)
    upload(page, [images["good_1"], images["blob_1"], images["corrupt"]])
    for name in ("good_1", "blob_1"):
        c = card(page, name)
        api = api_score(server, images[name])
        assert float(c.get_attribute("data-score")) == api["score"]  # exactly the API's number
        assert c.get_attribute("data-decision") == ("anomalous" if api["Anomaly"] else "normal")
        text = c.inner_text()
        assert "score_normalized" in text and "ms" in text and "threshold" in text
        assert c.locator("img.overlay").evaluate("el => el.naturalWidth") > 0  # server-rendered heatmap
    assert card(page, "blob_1").get_attribute("data-decision") == "anomalous"
    bad = card(page, "corrupt")
    assert "failed" in bad.get_attribute("class")
    assert "corrupt.png" in bad.inner_text() and "not a readable image" in bad.inner_text()
    page.uncheck("#overlay-on")  # the overlay toggle hides the heatmap
    assert card(page, "blob_1").locator("img.overlay").is_hidden()
    assert not rec.foreign()


def test_slider_redecides_in_the_browser_without_a_request(page, server, images, tmp_path, map_model, capsys):
    open_page(page, server)
    upload(page, [images["good_1"], images["good_2"], images["scratch_1"]])
    page.click(".tab[data-view=threshold]")
    assert "does not change" in page.inner_text("#view-threshold") or \
        "changes the decisions shown in this page only" in page.inner_text("#view-threshold")
    scores = [float(s) for s in page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.score)")]
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    set_slider(page, min(scores) - 1e-6)
    decisions = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.decision)")
    assert decisions == ["anomalous"] * 3
    set_slider(page, max(scores) + 1e-6)
    assert page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.decision)") == ["normal"] * 3
    assert "0 of 3 images anomalous" in page.inner_text("#thr-summary")
    assert page.locator("#hist").evaluate("c => c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                                          ".data.some(v => v > 0)")
    assert seen == [], seen  # re-deciding cost no request
    # export: a threshold file the CLI accepts for this model
    with page.expect_download() as dl:
        page.click("#thr-export")
    path = tmp_path / "thr.json"
    dl.value.save_as(path)
    body = json.loads(path.read_text())
    assert body["model_sha256"] == httpx.get(f"{server}/model").json()["model_sha256"]
    assert body["threshold"] == pytest.approx(max(scores) + 1e-6, rel=1e-6)
    assert cli_main(["predict", "--model", str(map_model), str(images["scratch_1"]), "--threshold", str(path),
                     "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["threshold"] == body["threshold"] and row["anomalous"] is False


def tiles(page) -> list[tuple[str, float]]:
    return [(n, float(sc)) for n, sc in page.eval_on_selector_all(
        ".tile", "ts => ts.map(t => [t.dataset.name, t.dataset.score])")]


def test_review_labels_survive_a_reload_and_export_as_csv(page, server, images, tmp_path, map_model, capsys):
    open_page(page, server)
    upload(page, [images["good_1"], images["blob_1"], images["scratch_1"], images["same_name"]])
    page.click(".tab[data-view=review]")
    shown = tiles(page)
    assert len(shown) == 4 and [s for _, s in shown] == sorted((s for _, s in shown), reverse=True)  # highest first
    assert [n for n, _ in shown].count("good_1.png") == 2  # same name, two images: labelled apart
    page.keyboard.press("d")  # first (highest) -> defective
    page.keyboard.press("j")
    page.keyboard.press("n")  # second -> normal
    page.locator(".tile").nth(2).locator("button", has_text="defective").click()
    page.reload()
    wait_for_model(page)
    page.click(".tab[data-view=review]")
    labelled = [(n, float(sc)) for n, sc in page.eval_on_selector_all(
        ".tile.labelled", "ts => ts.map(t => [t.dataset.name, t.dataset.score])")]
    assert labelled == shown[:3]  # labels (and the session's scores) kept across the reload
    page.select_option("#filter", "anomalous")
    thr = httpx.get(f"{server}/model").json()["threshold"]["value"]
    assert tiles(page) == [t for t in shown if t[1] > thr]
    with page.expect_download() as dl:
        page.click("#export-labels")
    path = tmp_path / "labels.csv"
    dl.value.save_as(path)
    assert path.read_text().splitlines()[0] == "name,label,score,model_sha256"
    sha = httpx.get(f"{server}/model").json()["model_sha256"]
    rows = {(r["name"], float(r["score"]), r["label"], r["model_sha256"])
            for r in csv.DictReader(io.StringIO(path.read_text()))}
    expected = {(*shown[0], "anomalous", sha), (*shown[1], "normal", sha), (*shown[2], "anomalous", sha)}
    assert rows == expected
    capsys.readouterr()
    assert cli_main(["calibrate", "--model", str(map_model), "--labels", str(path), "--dry-run"]) == 0  # issue 13 reads it


def test_api_key_is_asked_once_and_sent_with_every_request(page, keyed_server, images):
    assert httpx.post(f"{keyed_server}/infer", files={"file": ("a.png", images["good_1"].read_bytes())}
                      ).status_code == 401  # without the key no scoring succeeds
    rec = Recorder(page)
    page.goto(keyed_server + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "refused" in page.inner_text("#key-error")
    page.fill("#key-input", KEY)
    page.click("#key-submit")
    wait_for_model(page)
    upload(page, [images["blob_1"]])
    c = card(page, "blob_1")
    assert float(c.get_attribute("data-score")) == api_score(keyed_server, images["blob_1"], KEY)["score"]
    assert page.locator("#key-dialog[open]").count() == 0  # asked once
    assert not rec.foreign()


def test_docs_and_redoc_render_offline(page, server):
    rec = Recorder(page)
    page.goto(server + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "InsightAD" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector("text=/infer")
    page.goto(server + "/redoc")
    page.wait_for_selector("h1:has-text('InsightAD')")
    page.wait_for_load_state("networkidle")
    # ReDoc's bundle asks for its attribution logo from a CDN; the /redoc page's CSP stops it in the browser
    assert rec.urls and set(rec.foreign()) <= rec.blocked, (rec.foreign(), rec.blocked)


def test_camera_tab_scores_frames_with_a_live_overlay(page, server):
    rec = open_page(page, server)
    page.context.grant_permissions(["camera"])
    page.click(".tab[data-view=camera]")
    page.click("#cam-start")
    page.wait_for_function("() => Number(document.querySelector('#cam-stats')?.dataset.score) >= 0 && "
                           "document.getElementById('cam-overlay').naturalWidth > 0")
    assert "frames" in page.inner_text("#cam-stats")
    page.click(".tab[data-view=inspect]")  # leaving the tab stops the camera
    assert page.is_enabled("#cam-start") and not page.is_enabled("#cam-stop")
    assert not rec.foreign() and not rec.errors, (rec.foreign(), rec.errors)


def test_method_without_maps_says_why_there_is_no_heatmap(page, baseline_model, images):
    from insightad.apps.serve import create_app

    with running(create_app(baseline_model, ServeParams(engine="torch"))) as url:  # no ONNX export to wait for
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready]", state="attached")
        note = page.inner_text("#nomap-note")
        assert "baseline" in note and "no anomaly map" in note
        assert page.locator("#colorbar-box").is_hidden() and page.is_disabled("#overlay-on")
        upload(page, [images["blob_1"]])
        c = card(page, "blob_1")
        assert float(c.get_attribute("data-score")) == api_score(url, images["blob_1"])["score"]
        assert "no heatmap: baseline gives an image score only" in c.inner_text()


def test_label_export_guards_names_a_spreadsheet_would_run(page, server, images, tmp_path, map_model, capsys):
    """An image named like a formula (``=1+2.png``) is exported as ``'=1+2.png`` (a spreadsheet shows it as text
    instead of running it), and calibrate --labels reads the name back without the guard."""
    import shutil

    from insightad.decide.labels import read_labels

    formula = tmp_path / "=1+2.png"
    shutil.copy(images["blob_1"], formula)
    open_page(page, server)
    upload(page, [formula, images["good_1"]])
    page.click(".tab[data-view=review]")
    for i, name in enumerate(n for n, _ in tiles(page)):
        label = "defective" if name == formula.name else "normal"
        page.locator(".tile").nth(i).locator("button", has_text=label).click()
    with page.expect_download() as dl:
        page.click("#export-labels")
    path = tmp_path / "labels.csv"
    dl.value.save_as(path)
    rows = {r["name"]: r["label"] for r in csv.DictReader(io.StringIO(path.read_text()))}
    assert rows == {"'=1+2.png": "anomalous", "good_1.png": "normal"}
    assert sorted(read_labels(path).names) == ["=1+2.png", "good_1.png"]
    capsys.readouterr()
    assert cli_main(["calibrate", "--model", str(map_model), "--labels", str(path), "--dry-run"]) == 0, \
        capsys.readouterr().err
