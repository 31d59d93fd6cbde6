#!/usr/bin/env python
"""Baseline design sweep: feature levels x pooling x scorer, on several datasets and seeds at once.

Each dataset's images go through the backbone once (levels 1-4 kept as per-channel mean, spread and
maximum); every variant and seed is then scored from those statistics, with the same split as
``insightad train`` (holdout 0.2 for crack-style sets, MVTec's test split otherwise). One JSON line
per (dataset, seed, variant); a table of the mean and spread over seeds on stderr.

    python benchmarks/baseline_sweep.py --data ../shared/data/concrete_crack ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from insightad.backbones import build_extractor
from insightad.backbones.normalize import Normalize
from insightad.data.layouts import discover, evaluation_samples, holdout_split
from insightad.data.loader import iter_batches
from insightad.data.preprocess import Preprocessing
from insightad.methods.baseline import fit_gaussian, knn_distance
from insightad.methods.components.pooling import STATISTICS as POOLINGS

LEVELS = (1, 2, 3, 4)
LEVEL_SETS = {"2,3,4": (2, 3, 4), "1,2,3": (1, 2, 3), "1,2,3,4": (1, 2, 3, 4)}


def statistics_of(paths: list[Path], backbone: str, size: int) -> dict[str, dict[int, torch.Tensor]]:
    """Per image and level: raw channel mean, spatial std and max (not normalised)."""
    ext, spec, _ = build_extractor(backbone, list(LEVELS))
    prep = Preprocessing(size=(size, size), channels=3, mean=tuple(spec.mean), std=tuple(spec.std))
    norm = Normalize(prep.mean, prep.std, 3)
    out: dict[str, dict[int, list[torch.Tensor]]] = {k: {lv: [] for lv in LEVELS} for k in ("mean", "std", "max")}
    with torch.inference_mode():
        for b in iter_batches(paths, prep, 16, 0):
            for lv, f in zip(LEVELS, ext(norm(torch.from_numpy(np.stack(b.images))))):
                flat = f.flatten(2).float()
                out["mean"][lv].append(flat.mean(2))
                out["std"][lv].append(flat.std(2, unbiased=False))
                out["max"][lv].append(flat.amax(2))
    return {k: {lv: torch.cat(v) for lv, v in d.items()} for k, d in out.items()}


def embed(stats, idx: torch.Tensor, levels, pooling: str) -> torch.Tensor:
    return torch.cat([F.normalize(stats[s][lv][idx], dim=1) for lv in levels for s in POOLINGS[pooling]], 1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="+", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for data in args.data:
        ds = discover(data)
        paths = sorted({s.path for s in ds.samples})
        index = {q: i for i, q in enumerate(paths)}
        stats = statistics_of(paths, args.backbone, args.image_size)
        for seed in args.seeds:
            train, held = holdout_split(ds, 0.2, seed)
            split = {"root": str(ds.root), "train": [ds.rel(s.path) for s in train],
                     "holdout": [ds.rel(s.path) for s in held]}
            test = evaluation_samples(ds, split)
            tr = torch.tensor([index[s.path] for s in train])
            te = torch.tensor([index[s.path] for s in test])
            labels = np.array([s.label for s in test])
            for lname, levels in LEVEL_SETS.items():
                for pooling in POOLINGS:
                    a, b = embed(stats, tr, levels, pooling), embed(stats, te, levels, pooling)
                    for scorer in ("knn", "gaussian"):
                        if scorer == "knn":
                            s = knn_distance(b, a, 3)
                        else:
                            m, prec = fit_gaussian(a)
                            d = b - m
                            s = ((d @ prec) * d).sum(1).clamp_min(0).sqrt()
                        row = {"data": data.name, "seed": seed, "layers": lname, "pooling": pooling,
                               "scorer": scorer, "backbone": args.backbone, "image_size": args.image_size,
                               "image_auroc": round(float(roc_auc_score(labels, s.numpy())), 4)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.out:
                            with args.out.open("a") as f:
                                f.write(json.dumps(row) + "\n")
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["layers"], r["pooling"], r["scorer"]), {}).setdefault(r["data"], []).append(r["image_auroc"])
    names = [d.name for d in args.data]
    print(f"{'layers':<8} {'pooling':<13} {'scorer':<9} " + " ".join(f"{n[:22]:>22}" for n in names), file=sys.stderr)
    for (lv, po, sc), per in groups.items():
        cells = []
        for n in names:
            v = per.get(n, [])
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.fmean(v):.3f}±{sd:.3f} (n={len(v)})".rjust(22))
        print(f"{lv:<8} {po:<13} {sc:<9} " + " ".join(cells), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
