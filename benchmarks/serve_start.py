"""Start-up of `insightad serve`: process start to the first answered POST /infer, and its memory.

Runs the server with the given interpreter (e.g. a runtime-only venv, no PyTorch) on loopback, sends one
image to /infer as soon as the port accepts connections, and records the time from process start to that
answer (model hashing, loading and warm-up included), the server's RSS then, and after ``--settle`` more
requests. Repeats ``--runs`` times (warm page cache) and prints one JSON object (the median and each run).

    python benchmarks/serve_start.py --model bottle-padim.onnx --image bottle/test/good/000.png \
        --python build/wheel-test/venv/bin/python --runs 3 [--out result.json]

The server only ever listens on 127.0.0.1 and is stopped at the end of each run whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from load_test import rss_bytes, split_server_flags, stop_server  # this folder: run as `python benchmarks/serve_start.py`


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads): the start-up cost whatever the load."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, timeout: float) -> dict:
    req = urllib.request.Request(url, body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def one_run(python: str, model: str, body: bytes, settle: int, extra: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}/infer"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t0 = time.monotonic()
    proc = subprocess.Popen([python, "-m", "insightad", "serve", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), "--no-access-log", "--log-level", "warning", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        answer = None
        while time.monotonic() - t0 < 180:  # a bounded loop: the first answer, or give up
            if proc.poll() is not None:
                sys.exit(f"serve_start: server exited with {proc.returncode}: {proc.stderr.read()[-2000:]!r}")
            try:
                answer = post(url, body, 60)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.02)
        first = time.monotonic() - t0
        if answer is None:
            sys.exit("serve_start: no answer within 180 s")
        cpu_first = cpu_seconds(proc.pid)
        rss_first = rss_mb(proc.pid)
        for _ in range(settle):
            post(url, body, 60)
        torch_loaded = subprocess.run(["grep", "-c", "libtorch", f"/proc/{proc.pid}/maps"], capture_output=True,
                                      text=True).stdout.strip()
        return {"first_answer_s": round(first, 3), "server_cpu_s_at_first_answer": round(cpu_first, 2),
                "rss_mb_at_first_answer": round(rss_first, 1),
                "rss_mb_after_settle": round(rss_mb(proc.pid), 1), "score": answer["score"],
                "libtorch_mapped": torch_loaded not in ("", "0")}
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_server_flags(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True, type=Path)
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the server (default: this one)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=int, default=20, help="requests after the first before the second RSS sample")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    body = json.dumps({"image": base64.b64encode(args.image.read_bytes()).decode("ascii")}).encode()
    runs = [one_run(args.python, args.model, body, args.settle, extra) for _ in range(max(1, args.runs))]
    result = {"benchmark": "serve_start", "model": Path(args.model).name,
              "model_mb": round(Path(args.model).stat().st_size / 2**20, 1), "python": args.python,
              "image": args.image.name, "runs": runs,
              "median_first_answer_s": float(np.median([r["first_answer_s"] for r in runs])),
              "median_server_cpu_s_at_first_answer": float(np.median([r["server_cpu_s_at_first_answer"] for r in runs])),
              "median_rss_mb_after_settle": float(np.median([r["rss_mb_after_settle"] for r in runs])),
              "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "server_flags": extra}
    text = json.dumps(result)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
