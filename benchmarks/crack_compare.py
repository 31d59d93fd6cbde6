"""Does a self-supervised backbone help? Every detector on an ImageNet and on an SSL backbone (crack set).

The first seed's claim, measured with one protocol for all: the normal images are split once
(--holdout, --seed); each detector trains on the same normal training images; the SSL backbone
trains on those same images only (rotation prediction, no labels), so no evaluation image is ever
seen in training. Each model is scored on the held-out normal images plus

* ``balanced``: as many anomalous images as held-out normal ones, drawn with --seed (the first
  seed's balanced protocol), and
* ``all``: every anomalous image.

Image AUROC, and accuracy/precision/recall/F1 at each model's own default threshold (no tuning
on the evaluation images). One JSON line per (method, backbone), then a Markdown table on stderr.

    python benchmarks/crack_compare.py --data ../shared/data/concrete_crack --out runs/crack
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("INSIGHTAD_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="crack-style dataset (Negative/ and Positive/)")
    p.add_argument("--out", default="runs/crack_compare", help="folder for models and the SSL backbone")
    p.add_argument("--methods", default="baseline,svdd,padim,patchcore",
                   help="detectors to compare (those not installed are reported as missing)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="ImageNet backbone (and SSL architecture)")
    p.add_argument("--image-size", type=int, default=224, help="detector input size")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ssl-backbone", help="an existing SSL backbone file (skip SSL training)")
    p.add_argument("--ssl-image-size", type=int, default=160)
    p.add_argument("--ssl-epochs", type=int, default=3)
    p.add_argument("--ssl-lr", type=float, default=1e-4)
    p.add_argument("--ssl-init", default="imagenet", choices=("imagenet", "random"))
    p.add_argument("--ssl-pretext", default="rotation", choices=("rotation", "cutpaste"))
    p.add_argument("--ssl-time-budget", type=float, default=600.0, help="seconds of SSL training at most")
    p.add_argument("--weights", help="weights of the 'imagenet' backbone (a file, or random for a smoke test)")
    p.add_argument("--ssl-batch-size", type=int, default=16)
    p.add_argument("--svdd", default="{}", help="JSON of extra SVDD hyper-parameters")
    return p.parse_args()


def subset_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, pick: np.ndarray) -> dict:
    from insightad.evaluate.metrics import image_metrics

    m = image_metrics(labels[pick], scores[pick], threshold)
    return {k: m[k] for k in ("image_auroc", "f1", "accuracy", "precision", "recall", "n_normal", "n_anomalous")}


def balanced_pick(labels: np.ndarray, seed: int) -> np.ndarray:
    """All normal evaluation images and as many anomalous ones, drawn with ``seed``."""
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    drawn = np.random.default_rng(seed).choice(anomalous, size=min(len(normal), len(anomalous)), replace=False)
    return np.sort(np.concatenate([normal, drawn]))


def train_ssl(args, dp, out: Path) -> tuple[str, dict]:
    from insightad.apps.train import train_backbone

    t0 = time.perf_counter()
    params = {"backbone": args.backbone, "init": args.ssl_init, "image_size": args.ssl_image_size,
              "epochs": args.ssl_epochs, "lr": args.ssl_lr, "batch_size": args.ssl_batch_size, "seed": args.seed,
              "pretext": args.ssl_pretext, "time_budget": args.ssl_time_budget}
    trainer, path, _ = train_backbone(args.data, "ssl", params, dp, out / "ssl-backbone.safetensors", progress=False)
    return str(path), {"method": "ssl", "backbone": args.backbone, "params": params,
                       "pretext": args.ssl_pretext, "pretext_accuracy": trainer.accuracy_, "heldout": trainer.heldout_,
                       "stop_reason": trainer.result_.stop_reason,
                       "warning": trainer.warning_, "train_seconds": round(time.perf_counter() - t0, 1)}


def run_one(args, dp, method: str, backbone: str, label: str, out: Path) -> dict:
    from insightad.apps.train import train_model
    from insightad.data.layouts import discover, evaluation_samples

    params = {"backbone": backbone, "image_size": args.image_size, "seed": args.seed}
    if args.weights and label == "imagenet":
        params["weights"] = args.weights
    if method == "svdd":
        params.update(json.loads(args.svdd))
    t0 = time.perf_counter()
    det, _, split = train_model(args.data, method, params, dp, out / f"{method}-{label}.safetensors", progress=False)
    train_seconds = time.perf_counter() - t0
    samples = evaluation_samples(discover(args.data, dp.layout), split)
    t1 = time.perf_counter()
    scores = det.predict([s.path for s in samples], maps=False).scores
    score_seconds = time.perf_counter() - t1
    labels = np.array([s.label for s in samples])
    row = {"method": method, "backbone": label, "train_seconds": round(train_seconds, 1),
           "fit_seconds": round(det.fit_seconds_, 1), "score_seconds": round(score_seconds, 1),
           "n_train": len(split["train"]), "threshold_strategy": det.threshold_strategy_,
           "balanced": subset_metrics(labels, scores, det.threshold_, balanced_pick(labels, args.seed)),
           "all": subset_metrics(labels, scores, det.threshold_, np.arange(len(labels)))}
    if getattr(det, "training_", None) is not None:
        row["epochs_run"] = det.training_.epochs_run
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | backbone | balanced AUROC | balanced F1 | all AUROC | all F1 | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "balanced" not in r:
            continue
        b, a = r["balanced"], r["all"]
        lines.append(f"| {r['method']} | {r['backbone']} | {b['image_auroc']:.4f} | {b['f1']:.3f} | "
                     f"{a['image_auroc']:.4f} | {a['f1']:.3f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    import torch

    from insightad.config import DataParams
    from insightad.methods import list_methods

    args = parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dp = DataParams(holdout=args.holdout, seed=args.seed)
    methods = [m for m in args.methods.split(",") if m]
    missing = [m for m in methods if m not in list_methods()]
    for m in missing:
        print(json.dumps({"method": m, "missing": "not in this installation"}), flush=True)
    if args.ssl_backbone:
        ssl_path, ssl_row = args.ssl_backbone, {"method": "ssl", "reused": args.ssl_backbone}
    else:
        ssl_path, ssl_row = train_ssl(args, dp, out)
    print(json.dumps(ssl_row), flush=True)
    rows = []
    for method in [m for m in methods if m in list_methods()]:
        for label, backbone in (("imagenet", args.backbone), ("ssl", f"ssl:{ssl_path}")):
            row = run_one(args, dp, method, backbone, label, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
