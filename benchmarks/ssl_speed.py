#!/usr/bin/env python
"""Time and memory of whole ``insightad train --method ssl`` processes (the CutPaste fine-tune) in several
configurations, alternated on one machine: huge pages on (what ``train`` asks for) or off
(``THP_MEM_ALLOC_ENABLE=0``, which ``train`` leaves alone), and ``--freeze-levels``. One JSON line per run with
the wall and training seconds, user and system CPU seconds, minor page faults and peak RSS.

    python benchmarks/ssl_speed.py --data ../shared/data/concrete_crack --epochs 1 \\
        --configs thp=0,freeze=0 thp=1,freeze=0 thp=1,freeze=2 --out benchmarks/results/ssl-speed.jsonl

Accuracy is not measured here (one epoch is not a backbone anyone would use): see docs/ssl.md for the runs
with the default epochs and the detectors trained on them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from whole_process import cpu_model, timed  # a script beside this one: one way to time a process


def parse_config(text: str) -> dict[str, int]:
    """'thp=1,freeze=2' -> {'thp': 1, 'freeze': 2}."""
    out = {"thp": 1, "freeze": 0}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"--configs: unknown key {key!r} in {text!r} (thp, freeze)")
        out[key] = int(value)
    return out


def run_once(data: Path, cfg: dict[str, int], epochs: int, seed: int, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if not cfg["thp"]:
        env["THP_MEM_ALLOC_ENABLE"] = "0"  # the user's own setting: train leaves it as it is
    out = work / "ssl.safetensors"
    cmd = [sys.executable, "-m", "insightad", "train", "--method", "ssl", "--data", str(data), "--seed", str(seed),
           "--epochs", str(epochs), "--freeze-levels", str(cfg["freeze"]), "--out", str(out), "--no-progress"]
    r = timed(cmd, env=env)
    trained = re.search(r" in ([0-9.]+) s", r.pop("stdout"))
    return {**cfg, **r, "train_s": float(trained.group(1)) if trained else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", default=["thp=0,freeze=0", "thp=1,freeze=0", "thp=1,freeze=2"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=1, help="rounds; each round runs every configuration once")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.configs]
    for run in range(args.runs):
        for cfg in configs:
            with tempfile.TemporaryDirectory() as work:
                row = {"data": args.data.name, "epochs": args.epochs, "seed": args.seed, "run": run,
                       **run_once(args.data, cfg, args.epochs, args.seed, Path(work)),
                       "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "cpu": cpu_model(),
                       "load_after": [round(v, 2) for v in os.getloadavg()], "note": args.note}
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
