#!/usr/bin/env python
"""Peak RSS and wall time of whole ``insightad train`` processes, this checkout against another source tree
(``--compare``: e.g. a ``git worktree`` of the previous main), runs alternated on one machine so that both
see the same drift. One JSON line per run; a summary per (method, tree) on stderr.

    git worktree add /tmp/before <commit>
    python benchmarks/train_memory.py --data ../shared/data/mvtec_ad/bottle --methods padim patchcore \\
        --compare /tmp/before/src --runs 2 --out benchmarks/results/train-memory.jsonl

Peak RSS is the process's ``ru_maxrss`` as ``wait4`` reports it (children included); the backbone graph
is cached by the first run (the first run of each tree is not dropped: run once beforehand to warm it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from whole_process import timed  # a script beside this one: one way to time a process and read its peak

HERE = Path(__file__).resolve().parents[1] / "src"


def train_once(data: Path, method: str, src: Path, work: Path) -> dict:
    out = work / f"{method}.safetensors"
    for f in (out, out.with_suffix(".onnx")):
        f.unlink(missing_ok=True)
    r = timed([sys.executable, "-m", "insightad", "train", "--data", str(data), "--method", method, "--out", str(out)],
              env={**os.environ, "PYTHONPATH": str(src)})
    return {"wall_s": round(r["wall_s"], 1), "peak_rss_mb": r["peak_rss_mb"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["padim"])
    ap.add_argument("--compare", type=Path, help="another source tree (its src/ folder) to alternate with")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = ap.parse_args(argv)
    trees = [("this", HERE)] + ([("compare", args.compare.resolve())] if args.compare else [])
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for i in range(args.runs):
                for label, src in (trees if i % 2 == 0 else trees[::-1]):
                    row = {"method": method, "tree": label, "src": str(src), "run": i,
                           **train_once(args.data, method, src, Path(tmp)), **stamp}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    for method in args.methods:
        for label, _ in trees:
            mine = [r for r in rows if r["method"] == method and r["tree"] == label]
            print(f"{method} {label}: peak {min(r['peak_rss_mb'] for r in mine):.0f}-"
                  f"{max(r['peak_rss_mb'] for r in mine):.0f} MB, {min(r['wall_s'] for r in mine):.1f}-"
                  f"{max(r['wall_s'] for r in mine):.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
