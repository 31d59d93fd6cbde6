"""Benchmark `insightad batch`: one process vs Ray local with 1 and 2 workers, JSON lines on stdout.

A folder of N images is made of symlinks to ../shared/data/concrete_crack (cycled), a PaDiM model
with default settings is trained on the crack set's normal images (or --model is used), and each
configuration runs as its own `insightad batch` process on the ONNX Runtime engine:

- single: this process, --threads 2 (the machine's 2 cores);
- ray1 / ray2: --ray local --ray-cpus 2 with 1 or 2 workers (1 thread each).

Reported per run: images/s of the scoring loop (Ray start-up excluded and reported apart), wall
time of the whole command, the driver's peak RSS and each Ray worker's peak RSS (VmHWM from /proc,
sampled while the run lasts). Run it under `nice -n 10` on a shared machine.

    PYTHONPATH=src python benchmarks/batch.py --images 5000 [--model M] > results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "concrete_crack"


def make_inputs(src: Path, n: int, dest: Path) -> Path:
    """``n`` symlinks to the crack images (both classes), cycled, in ``dest/in``."""
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not images:
        sys.exit(f"{src}: no images")
    root = dest / "in"
    root.mkdir(parents=True)
    for i in range(n):
        img = images[i % len(images)]
        os.symlink(img, root / f"{i:07d}{img.suffix}")
    return root


def peak_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def ray_workers(root: int) -> list[int]:
    """Pids of the Ray actor processes (command line ``ray::...MapWorker``) descended from ``root``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::") and b"MapWorker" in cmd:
                pid = p = int(d.name)
                while p > 1 and p != root:
                    p = _parent(p)
                if p == root:
                    out.append(pid)
    return out


def run(name: str, cmd: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    driver = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            driver[0] = max(driver[0], peak_kb(proc.pid))
            for pid in ray_workers(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), peak_kb(pid))
            stop.wait(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    wall = time.perf_counter() - t0
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit(f"{name}: no JSON summary (exit {proc.returncode}):\n{err[-3000:]}")
    return {"config": name, "images": summary["inputs"], "errors": summary["errors"],
            "images_per_second": summary["images_per_second"], "scoring_seconds": summary["seconds"],
            "ray_startup_seconds": summary["startup_seconds"], "wall_seconds": round(wall, 2),
            "driver_peak_rss_mb": round(driver[0] / 1024, 1),
            "worker_peak_rss_mb": sorted(round(v / 1024, 1) for v in peaks.values()), "exit": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--model", help="a PaDiM model file (default: train one with default settings on the crack set)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--configs", default="single,ray1,ray2")
    args = ap.parse_args()
    env = {**os.environ, "INSIGHTAD_OFFLINE": "1"}
    py = [sys.executable, "-m", "insightad"]
    with tempfile.TemporaryDirectory(prefix="insightad-bench-batch-") as tmp:
        tmp_path = Path(tmp)
        model = args.model
        if not model:
            model = str(tmp_path / "padim.safetensors")
            t0 = time.perf_counter()
            subprocess.run(py + ["train", "--method", "padim", "--data", args.data, "--out", model, "--no-progress"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            print(json.dumps({"config": "train", "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        inputs = make_inputs(Path(args.data), args.images, tmp_path)
        # the ONNX export is made once, before any timing (cached per model file)
        subprocess.run(py + ["predict", "--model", model, str(next(inputs.iterdir())), "--engine", "onnx"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        base = py + ["batch", "--model", model, "--input", str(inputs), "--engine", "onnx", "--json",
                     "--no-progress", "--chunk", str(args.chunk)]
        configs = {"single": ["--threads", "2"],
                   "ray1": ["--ray", "local", "--ray-cpus", "2", "--workers", "1"],
                   "ray2": ["--ray", "local", "--ray-cpus", "2", "--workers", "2"]}
        for name in args.configs.split(","):
            out = tmp_path / f"{name}.parquet"
            print(json.dumps(run(name, base + ["--out", str(out)] + configs[name], env)), flush=True)


if __name__ == "__main__":
    main()
