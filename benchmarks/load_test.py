"""Load test of `insightad serve`: start it on loopback, hammer POST /infer with N clients for a fixed time.

Prints one JSON object: requests/s, latency percentiles (ms), errors by kind, the server's resident
memory (RSS) at the start of the load, at 60 s and at the end (single samples, and medians over 10 s
windows, since RSS under load swings with the work in flight), and what the server's own metrics say
(images scored, mean micro-batch size, 503s). The criteria of issue 7 are evaluated too: no errors,
and RSS at the end <= RSS at 60 s + 5 %.

    python benchmarks/load_test.py --model bottle.safetensors --images /path/to/bottle/test \
        --clients 8 --duration 300 [--out result.json] [-- extra `insightad serve` flags]

The server only ever listens on 127.0.0.1 and is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def load_payloads(folder: Path, limit: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """JSON bodies {"image": base64} for up to ``limit`` images under ``folder`` (sorted, recursive)."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
    if not files:
        sys.exit(f"load_test: no images under {folder}")
    files = files[:limit]
    sizes = []
    for p in files:
        with Image.open(p) as im:
            sizes.append(im.size)
    return [json.dumps({"image": base64.b64encode(p.read_bytes()).decode("ascii")}).encode() for p in files], sizes


def start_server(model: str, extra: list[str], log_path: Path, python: str = sys.executable
                 ) -> tuple[subprocess.Popen, str]:
    cmd = [python, "-m", "insightad", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
           "--no-access-log", "--log-level", "warning", *extra]
    log = open(log_path, "w")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} if python != sys.executable \
        else None  # another interpreter (a runtime-only venv) runs its own installed copy
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_test: server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        if m:
            url = m.group(1)
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    stop_server(proc)
    sys.exit("load_test: the server did not become healthy within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Recorder:
    """Latencies of successful requests and error counts, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def ok(self, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def refused(self, status: int) -> None:
        """A bad request answered with the right 4xx JSON error (counted apart, not an error)."""
        with self.lock:
            key = f"refused_{status}"
            self.errors.setdefault("_refused", {})  # type: ignore[arg-type]
            self.errors["_refused"][key] = self.errors["_refused"].get(key, 0) + 1  # type: ignore[index]


# Bad requests mixed into the load (--bad-fraction): each must get a 4xx JSON answer, never a 5xx or a reset.
BAD_BODIES = [
    b'{"image": "@@@ not base64 @@@"}',                                   # bad base64
    b'{"image": "' + base64.b64encode(b"this is not an image") + b'"}',   # not an image
    b'{"picture": "abc"}',                                              # missing field
]


def client_loop(url: str, payloads: list[bytes], offset: int, t_measure: float, t_end: float, rec: Recorder,
                timeout: float, bad_fraction: float = 0.0, oversized: bytes = b"") -> None:
    """Send requests back to back until ``t_end`` (a bounded loop); record those started after ``t_measure``.
    A ``bad_fraction`` of them are bad (bad base64, not an image, missing field, oversized body)."""
    headers = {"Content-Type": "application/json"}
    bad = BAD_BODIES + ([oversized] if oversized else [])
    rng = np.random.default_rng(offset)
    i = offset
    with httpx.Client(timeout=timeout) as http:
        while time.monotonic() < t_end:
            is_bad = rng.random() < bad_fraction
            body = bad[i % len(bad)] if is_bad else payloads[i % len(payloads)]
            i += 1
            t0 = time.monotonic()
            counted = t0 >= t_measure
            try:
                r = http.post(f"{url}/infer", content=body, headers=headers)
                dt = time.monotonic() - t0
                if is_bad:
                    if counted:
                        ok = 400 <= r.status_code < 500 and "detail" in r.json()
                        rec.refused(r.status_code) if ok else rec.error(f"bad_request_got_{r.status_code}")
                    continue
                if r.status_code == 200 and "score" in r.json():
                    if counted:
                        rec.ok(dt)
                elif counted:
                    rec.error(f"http_{r.status_code}")
            except httpx.HTTPError as e:
                if counted:
                    rec.error(type(e).__name__)


def server_metrics(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text

    def value(name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    batches = value("insightad_batch_size_count")
    return {"images_scored": value("insightad_images_scored_total"), "forward_passes": batches,
            "mean_batch_size": round(value("insightad_batch_size_sum") / batches, 3) if batches else None,
            "rejected_503": value("insightad_rejected_total")}


def split_server_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the `insightad serve` flags after ``--``)."""
    if "--" not in argv:
        return argv, []
    k = argv.index("--")
    return argv[:k], argv[k + 1:]


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_server_flags(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model file to serve")
    ap.add_argument("--images", required=True, type=Path, help="folder of images to send (recursive)")
    ap.add_argument("--max-images", type=int, default=64, help="at most this many distinct images (default 64)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of measured load (default 300)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (default 5)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    ap.add_argument("--bad-fraction", type=float, default=0.0,
                    help="fraction of requests that are bad (bad base64, not an image, missing field, oversized)")
    ap.add_argument("--server-log", type=Path, default=Path("/tmp/insightad-load-test-server.log"))
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that runs the server, e.g. a runtime-only venv (default: this one)")
    args = ap.parse_args(argv)

    payloads, sizes = load_payloads(args.images, args.max_images)
    proc, url = start_server(args.model, extra, args.server_log, args.python)
    rss: dict[str, int] = {}
    samples: list[tuple[float, int]] = []
    try:
        rss["start"] = rss_bytes(proc.pid)
        rec = Recorder()
        t_start = time.monotonic()
        t_measure = t_start + args.warmup
        t_end = t_measure + args.duration
        oversized = b'{"image": "' + b"A" * int(25e6) + b'"}' if args.bad_fraction else b""  # over --max-body-mb 20
        threads = [threading.Thread(target=client_loop, args=(url, payloads, k * 7, t_measure, t_end, rec,
                                                              args.timeout, args.bad_fraction, oversized), daemon=True)
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        while time.monotonic() < t_end:  # sample RSS twice a second while the load runs
            time.sleep(min(0.5, max(0.0, t_end - time.monotonic())))
            elapsed = time.monotonic() - t_measure
            samples.append((elapsed, rss_bytes(proc.pid)))
            if "at_60s" not in rss and elapsed >= 60:
                rss["at_60s"] = samples[-1][1]
        rss["end"] = rss_bytes(proc.pid)
        for t in threads:
            t.join(args.timeout + 5)
        measured = time.monotonic() - t_measure
        time.sleep(5)
        rss["idle_5s_after"] = rss_bytes(proc.pid)
        metrics = server_metrics(url)
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        stop_server(proc)

    lat = np.array(rec.latencies) * 1000.0
    refused = rec.errors.pop("_refused", {})
    n_err = sum(rec.errors.values())
    mb = 1 / (1024 * 1024)
    result = {
        "url": url, "model": args.model, "images": len(payloads),
        "image_sizes": sorted({f"{w}x{h}" for w, h in sizes}),
        "mean_request_bytes": int(np.mean([len(p) for p in payloads])),
        "clients": args.clients, "duration_s": round(measured, 1), "warmup_s": args.warmup,
        "server_flags": extra, "server_python": args.python,
        "requests_ok": int(lat.size), "requests_per_s": round(lat.size / measured, 2),
        "latency_ms": ({k: round(float(np.percentile(lat, q)), 1) for k, q in
                        (("p50", 50), ("p95", 95), ("p99", 99))} | {"mean": round(float(lat.mean()), 1),
                                                                     "max": round(float(lat.max()), 1)})
        if lat.size else None,
        "errors": n_err, "errors_by_kind": rec.errors, "bad_requests_refused_4xx": refused,
        "rss_mb": {k: round(v * mb, 1) for k, v in rss.items()},
        "rss_mb_max": round(max(v for _, v in samples) * mb, 1) if samples else None,
        "rss_mb_each_minute": [round(min(samples, key=lambda s: abs(s[0] - m))[1] * mb, 1)
                               for m in range(0, int(measured) + 1, 60)] if samples else [],
        "server_metrics": metrics, "server_health_after": health["status"],
        "cpu_count": os.cpu_count(),
    }
    if "at_60s" in rss:
        # Under load RSS swings with the requests and forward passes in flight at the sampling instant,
        # so the criterion is also checked on medians over 10 s windows (55-65 s, and the last 10 s).
        at_60 = float(np.median([v for t, v in samples if 55 <= t <= 65]))
        last = float(np.median([v for t, v in samples if t >= samples[-1][0] - 10]))
        result["rss_mb_median"] = {"55_65s": round(at_60 * mb, 1), "last_10s": round(last * mb, 1)}
        result["criteria"] = {"no_errors": n_err == 0,
                              "rss_end_le_rss_60s_plus_5pct": rss["end"] <= rss["at_60s"] * 1.05,
                              "rss_median_end_le_median_60s_plus_5pct": last <= at_60 * 1.05}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from insightad.io import atomic_write

        atomic_write(args.out, lambda tmp: tmp.write_text(text + "\n"))
    return 0 if n_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
