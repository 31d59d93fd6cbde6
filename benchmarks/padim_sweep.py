#!/usr/bin/env python
"""PaDiM sweep: covariance shrinkage and the image score (the mean of the map's top fraction), judged on
validation data and reported on the test split.

For one dataset and seed, PaDiM is fitted once with the method's own code on ``insightad train``'s split.
Then, for every shrinkage a (each position's covariance pulled towards the mean covariance over
positions: (1 - a) cov_p + a mean_p cov_p, before eps I), every image-score fraction q is scored from
the same maps:

- validation: out-of-fold scores of the training normals and of synthetic defects made from them
  (``methods.crossfit``, exactly what ``insightad train`` computes for its threshold), AUROC normal vs
  defect; this is what a default may be chosen on;
- test: the dataset's test images (MVTec split; crack: the held-out negatives and all positives).

One JSON line per (dataset, seed, shrinkage, fraction).

    python benchmarks/padim_sweep.py --data ../shared/data/concrete_crack --seeds 0 1 2 \\
        --out benchmarks/results/padim-sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from insightad.config import DataParams
from insightad.data.layouts import discover, evaluation_samples, holdout_split
from insightad.methods import create_detector, crossfit
from insightad.methods.components.maps import top_mean
from insightad.methods.padim import PadimModel


def validation_maps(det, paths: list, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out-of-fold normal maps, synthetic defect maps), flattened, as ``train``'s cross-fitting makes them."""
    seen: list[torch.Tensor] = []
    original = PadimModel.score_distances

    def keep(self, d):
        scores, maps = original(self, d)
        seen.append(maps.flatten(1).clone())
        return scores, maps

    PadimModel.score_distances = keep  # type: ignore[method-assign]
    try:
        folds = crossfit.fold_ids(len(paths), crossfit.DEFAULT_FOLDS, seed)
        crossfit.out_of_fold(det, paths, k=crossfit.DEFAULT_FOLDS, seed=seed)
    finally:
        PadimModel.score_distances = original  # type: ignore[method-assign]
    counts = [int((folds == f).sum()) for f in sorted(set(folds.tolist()))]
    return torch.cat([m[:n] for m, n in zip(seen, counts)]), torch.cat([m[n:] for m, n in zip(seen, counts)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--shrinkage", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        dp = DataParams(seed=seed)
        ds = discover(args.data, dp.layout, dp.normal_dir, dp.abnormal_dir)
        train, held = holdout_split(ds, dp.holdout, dp.seed)
        split = {"root": str(ds.root), "train": [ds.rel(s.path) for s in train],
                 "holdout": [ds.rel(s.path) for s in held]}
        tests = evaluation_samples(ds, split)
        labels = np.array([s.label for s in tests])
        paths = [s.path for s in train]
        for a in args.shrinkage:
            det = create_detector("padim", seed=seed, shrinkage=a, score_top=0.0).fit(paths)
            model = det._model_as(PadimModel)
            normal, defect = validation_maps(det, paths, seed)
            with torch.inference_mode():
                test = torch.cat([model.score_distances(model.distances(z))[1].flatten(1)
                                  for z in det.embeddings([s.path for s in tests])])
            truth = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
            for q in args.fractions:
                row = {"data": ds.root.name, "seed": seed, "shrinkage": a, "score_top": q,
                       "val_auroc": round(float(roc_auc_score(truth, np.r_[top_mean(normal, q), top_mean(defect, q)])), 4),
                       "test_auroc": round(float(roc_auc_score(labels, top_mean(test, q).numpy())), 4)}
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        print(f"done {ds.root.name} seed {seed}", file=sys.stderr)


if __name__ == "__main__":
    main()
