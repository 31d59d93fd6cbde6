"""What the resize definition changes in accuracy: train + evaluate PaDiM with one source tree's CLI.

Run once with the tree before issue 14 (Pillow's fixed-point bilinear) and once with this one (the
float antialiased bilinear of ``data/resize.py``); one JSON line each (image and pixel AUROC where the
data has masks). The CLI runs in a subprocess whose PYTHONPATH is ``--src``:

    nice -n 10 python benchmarks/resize_auroc.py --src /work/main/src --label pillow-fixed-point \
        --data ../shared/data/mvtec_ad/bottle --out benchmarks/results/resize-auroc.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_cli(src: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": src, "INSIGHTAD_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "insightad", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"insightad {args[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="the source tree to run (its src/ folder)")
    p.add_argument("--label", required=True, help="what resize that tree does (recorded)")
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="padim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON-lines file to append to")
    a = p.parse_args()
    commit = subprocess.run(["git", "-C", a.src, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.safetensors"
        t0 = time.perf_counter()
        run_cli(a.src, "train", "--data", a.data, "--method", a.method, "--seed", str(a.seed), "--out", str(model),
                "--no-progress")
        train_s = time.perf_counter() - t0
        ev = json.loads(run_cli(a.src, "evaluate", "--model", str(model), "--data", a.data, "--json", "--engine",
                                "torch"))
    row = {"bench": "resize-auroc", "resize": a.label, "commit": commit, "data": a.data, "method": a.method,
           "seed": a.seed, "image_auroc": ev.get("image_auroc"), "pixel_auroc": ev.get("pixel_auroc"),
           "f1": ev.get("f1"), "n_test": ev.get("n_images") or ev.get("n_test"), "train_s": round(train_s, 1),
           "note": "machine shared by 5 sessions (2 cores): times are under load"}
    line = json.dumps(row)
    print(line)
    with open(a.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
