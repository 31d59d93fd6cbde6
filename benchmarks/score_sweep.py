#!/usr/bin/env python
"""Image-score sweep for the map methods (PaDiM, PatchCore): the image score as the mean of the map's top
fraction (0: the method's own, the maximum), and PaDiM's covariance shrinkage, judged on validation data
and reported on the test split.

For one dataset and seed, the method is fitted with its own code on ``insightad train``'s split (PaDiM:
once per shrinkage a, each position's covariance pulled towards the mean covariance over positions:
(1 - a) cov_p + a mean_p cov_p, before eps I). Then every image-score fraction q is scored from the same maps:

- validation: out-of-fold maps of the training normals and of synthetic defects made from them
  (``methods.crossfit``, exactly what ``insightad train`` computes for its threshold: PaDiM's exact
  k-fold, PatchCore's every normal against the bank without its own patches; until 2026-12-04 one
  held-out fold refitted on the others, what docs/defaults.md's PatchCore sweep used), AUROC normal vs
  defect; this is what a default may be chosen on;
- test: the dataset's test images (MVTec split; crack: the held-out negatives and all positives).

q = 0 is the method's own image score (PaDiM: the map's maximum; PatchCore: the paper's re-weighted
maximum). One JSON line per (dataset, seed, shrinkage, fraction).

    python benchmarks/score_sweep.py --method padim --data ../shared/data/concrete_crack --seeds 0 1 2 \\
        --out benchmarks/results/padim-sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from insightad.config import DataParams
from insightad.data.layouts import discover, evaluation_samples, holdout_split
from insightad.methods import create_detector, crossfit
from insightad.methods.components.maps import top_mean
from insightad.methods.padim import PadimModel
from insightad.methods.patchcore import PatchCoreModel

SCORING = {"padim": (PadimModel, "score_distances"), "patchcore": (PatchCoreModel, "score_patches")}


@contextmanager
def recorded(method: str):
    """While inside, every (scores, maps) the method's model computes is kept, flattened, in order."""
    cls, name = SCORING[method]
    original: Callable = getattr(cls, name)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(self, *args, **kwargs):
        scores, maps = original(self, *args, **kwargs)
        seen.append((scores.flatten().clone(), maps.flatten(1).clone()))
        return scores, maps

    setattr(cls, name, keep)
    try:
        yield seen
    finally:
        setattr(cls, name, original)


def joined(seen: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([s for s, _ in seen]), torch.cat([m for _, m in seen])


def validation(method: str, det, paths: list, seed: int) -> tuple[tuple, tuple, crossfit.OutOfFold]:
    """((scores, maps) of the out-of-fold normals, the same of the synthetic defects, the validation itself), as
    ``train`` makes them: fold by fold, each fold's normals then its defects (PaDiM: one model call per fold;
    PatchCore: every normal and defect against the bank without its source image's patches)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    if method == "patchcore":
        original = det.score_without_source

        def keep(images, sources, features=None):
            scores, maps = original(images, sources, features)
            seen.append((torch.from_numpy(np.asarray(scores)), torch.from_numpy(np.asarray(maps)).flatten(1)))
            return scores, maps

        det.score_without_source = keep
        try:
            oof = crossfit.out_of_fold(det, paths, k=crossfit.DEFAULT_FOLDS, seed=seed)
        finally:
            del det.score_without_source
    else:
        with recorded(method) as seen:
            oof = crossfit.out_of_fold(det, paths, k=crossfit.DEFAULT_FOLDS, seed=seed)
    folds = crossfit.fold_ids(len(paths), crossfit.DEFAULT_FOLDS, seed)
    counts = [int((folds == f).sum()) for f in sorted(set(folds.tolist()))]
    if len(seen) != len(counts):
        raise RuntimeError(f"validation: {len(seen)} scoring calls for {len(counts)} folds")
    parts = [(s[:n], m[:n], s[n:], m[n:]) for (s, m), n in zip(seen, counts)]
    normal = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    defect = (torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]))
    return normal, defect, oof


def crack_or_mvtec_split(data: str, seed: int) -> tuple[str, list, list, np.ndarray]:
    """``insightad train``'s split of ``data`` for ``seed``: (dataset name, training samples, test samples, test
    labels); the test samples are what ``evaluate`` scores (MVTec test split; crack: held-out and positives)."""
    dp = DataParams(seed=seed)
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    train, held = holdout_split(ds, dp.holdout, dp.seed)
    split = {"root": str(ds.root), "train": [ds.rel(s.path) for s in train], "holdout": [ds.rel(s.path) for s in held]}
    tests = evaluation_samples(ds, split)
    return ds.root.name, train, tests, np.array([s.label for s in tests])


def emit(row: dict, out: str | None) -> None:
    """One JSON line to stdout, and appended to ``out`` when given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def image_scores(scores: torch.Tensor, maps: torch.Tensor, q: float) -> np.ndarray:
    return (scores if q == 0 else top_mean(maps, q)).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(SCORING), default="padim")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--shrinkage", type=float, nargs="+", default=[0.0, 0.1, 0.2], help="PaDiM only")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        name, train, tests, labels = crack_or_mvtec_split(args.data, seed)
        paths = [s.path for s in train]
        for a in (args.shrinkage if args.method == "padim" else [None]):
            own = {"shrinkage": a, "score_top": 0.0} if args.method == "padim" else {}
            det = create_detector(args.method, seed=seed, **own).fit(paths)
            normal, defect, _ = validation(args.method, det, paths, seed)
            with recorded(args.method) as seen:
                det.predict([s.path for s in tests], maps=False)
            test = joined(seen)
            truth = np.r_[np.zeros(len(normal[0])), np.ones(len(defect[0]))]
            for q in args.fractions:
                val = np.r_[image_scores(*normal, q), image_scores(*defect, q)]
                row = {"data": name, "method": args.method, "seed": seed, "shrinkage": a, "score_top": q,
                       "val_auroc": round(float(roc_auc_score(truth, val)), 4),
                       "test_auroc": round(float(roc_auc_score(labels, image_scores(*test, q))), 4)}
                emit(row, args.out)
        print(f"done {name} seed {seed}", file=sys.stderr)


if __name__ == "__main__":
    main()
