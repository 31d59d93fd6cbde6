#!/usr/bin/env python
"""Train and evaluate the trained methods (autoencoder, svdd, any detector) over seeds; JSON lines out.

    nice -n 10 python benchmarks/trained.py --data ../shared/data/concrete_crack --method svdd \\
        --seeds 0 1 2 --set granularity=patch --out benchmarks/results/svdd-crack.jsonl

The protocol is the CLI's: ``train --data D`` (holdout 0.2 and the seed where the layout has no test
split; the default threshold from out-of-fold validation, as ``train`` sets it), then ``evaluate`` on
the same path (held-out normals and every anomalous image). Each run is a fresh process (``--worker``);
its line has image/pixel AUROC, F1 and recall at the default threshold, the held-out normals it flags,
the synthetic AUROC of the validation, fit wall time, the process CPU time and the machine's load
average before and after (this machine is shared: wall time alone says little).
``--backbone-file`` trains every run on an SSL backbone file instead of the ImageNet one.
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


def run_one(spec: dict) -> dict:
    import resource

    from insightad.backbones.registry import SSL_FINE_TUNE
    from insightad.runtime import huge_pages_for_tensors

    if spec["set"].get("backbone") == SSL_FINE_TUNE:
        huge_pages_for_tensors()  # as `insightad train --backbone ssl` does, before PyTorch is imported
    from insightad.apps.train import train_model
    from insightad.config import DataParams, DecisionParams
    from insightad.evaluate.run import evaluate_model

    load_before = os.getloadavg()
    params = {"seed": spec["seed"], "device": "cpu", **spec["set"]}
    dp = DataParams(seed=spec["seed"], holdout=spec["holdout"])
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    det, _, split = train_model(spec["data"], spec["method"], params, dp, spec["model_path"], progress=False,
                                 decision=DecisionParams())
    train_wall = time.perf_counter() - t0
    cpu_train = time.process_time() - cpu0
    ev = evaluate_model(det, spec["data"], dp, progress=False)
    m = ev.metrics
    training = getattr(det, "training_", None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    decision = (getattr(det, "threshold_info_", None) or {}).get("decision", {})
    return {"method": spec["method"], "data": Path(spec["data"]).name, "seed": spec["seed"], "set": spec["set"],
            "image_auroc": m.get("image_auroc"), "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro"),
            "f1": m.get("f1"), "synthetic_auroc": decision.get("synthetic_auroc"),
            "held_out_false_alarms": m.get("false_alarm_rate"), "recall": m.get("recall"), "fit_s": round(det.fit_seconds_, 1),
            "train_wall_s": round(train_wall, 1),
            "train_cpu_s": round(cpu_train, 1), "epochs_run": training.epochs_run if training else None,
            "best_epoch": training.best_epoch if training else None,
            "stopped": (training.stop_reason if training and hasattr(training, "stop_reason") else None),
            "n_train": len(split["train"]), "n_eval": len(ev.samples),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "torch_threads": _threads(),
            "weights": [round(float(w), 3) for w in getattr(det, "weights_", [])] or None}  # an ensemble's members


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--method", default="svdd")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", default="", help="a name for this configuration in the JSON lines")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))), flush=True)
        return 0
    from bench import parse_set  # the same KEY=VALUE parsing as bench.py (this folder is on sys.path)

    if args.data is None or not args.data.is_dir():
        p.error("--data: a dataset folder is required")
    rows = []
    with tempfile.TemporaryDirectory(prefix="insightad-trained-") as tmp:
        for seed in args.seeds:
            spec = {"method": args.method, "seed": seed, "data": str(args.data), "holdout": args.holdout,
                    "set": parse_set(args.set), "model_path": str(Path(tmp) / f"seed{seed}.safetensors")}
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"trained: seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["label"] = args.label
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with args.out.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
    for key in ("image_auroc", "pixel_auroc"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            spread = (max(vals) - min(vals)) / 2
            print(f"{args.label or args.method} {key}: mean {statistics.fmean(vals):.4f} +- {spread:.4f} "
                  f"(half range, {len(vals)} seeds)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
