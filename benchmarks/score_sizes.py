#!/usr/bin/env python
"""The map methods' image score against the size of the defect: validation AUROC per synthetic-defect size
class for each image-score fraction (the mean of the map's top q; q = 0: the map's maximum), and for the
largest standardised score over several fractions ("multi": each fraction's score standardised by the
out-of-fold normals' mean and spread, the image scored by the largest).

Why: the default fractions (PaDiM 1%, PatchCore 5%) were chosen on validation defects of 1-10% of the image
and on crack's test, where a large fraction follows a long crack; a defect of a few hundred pixels fills a
small part of a 5% top and is diluted by the rest. This measures how much, on the same validation
(``insightad train``'s out-of-fold normals and synthetic defects), per size class of the defect's mask.
The standardisation of "multi" uses half of the validation normals and is judged on the other half (then
the other way round, averaged), so no normal is scored by statistics it helped to make.

    python benchmarks/score_sizes.py --method patchcore --data ../shared/data/concrete_crack --seeds 0 1 2 \\
        --out benchmarks/results/score-sizes.jsonl
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from insightad.methods import create_detector
from insightad.methods.components.maps import top_mean
from score_sweep import crack_or_mvtec_split, emit, recorded, validation

SIZES = (("small", 0.0, 0.01), ("medium", 0.01, 0.03), ("large", 0.03, 1.01))  # mask area / image area


def validation_maps(method: str, det, paths: list, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(normal maps (N, h*w), defect maps (M, h*w), defect mask areas (M,)) of ``train``'s validation."""
    (_, normal), (_, defect), oof = validation(method, det, paths, seed)
    areas = np.array([float(np.mean(d.mask > 0)) for d in oof.defects])
    if len(areas) != defect.shape[0]:
        raise RuntimeError(f"validation: {len(areas)} defect masks for {defect.shape[0]} maps")
    return normal.float(), defect.float(), areas


def fraction_scores(maps: torch.Tensor, q: float) -> np.ndarray:
    return (maps.amax(1) if q == 0 else top_mean(maps, q)).double().numpy()


def standardised(scores: dict[float, np.ndarray], ref: dict[float, np.ndarray]) -> np.ndarray:
    """The largest over fractions of (score - mean) / std of the reference normals' scores at that fraction."""
    return np.max([(scores[q] - ref[q].mean()) / max(ref[q].std(ddof=1), 1e-12) for q in scores], axis=0)


def auroc(normal: np.ndarray, defect: np.ndarray) -> float | None:
    if len(normal) == 0 or len(defect) == 0:
        return None
    truth = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
    return round(float(roc_auc_score(truth, np.r_[normal, defect])), 4)


def by_size(normal: np.ndarray, defect: np.ndarray, areas: np.ndarray) -> dict:
    out = {"all": auroc(normal, defect)}
    for name, lo, hi in SIZES:
        out[name] = auroc(normal, defect[(areas >= lo) & (areas < hi)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("padim", "patchcore"), default="patchcore")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1])
    ap.add_argument("--multi", type=float, nargs="+", action="append",
                    help="fractions combined by the largest standardised score (repeatable)")
    ap.add_argument("--out")
    args = ap.parse_args()
    multis = args.multi or [[0.0, 0.05], [0.001, 0.05], [0.0, 0.005, 0.05]]
    torch.set_num_threads(1)
    for seed in args.seeds:
        name, train, tests, labels = crack_or_mvtec_split(args.data, seed)
        det = create_detector(args.method, seed=seed).fit([s.path for s in train])
        normal, defect, areas = validation_maps(args.method, det, [s.path for s in train], seed)
        with recorded(args.method) as seen:
            det.predict([s.path for s in tests], maps=False)
        test = torch.cat([m for _, m in seen]).float()
        qs = sorted({q for m in multis for q in m} | set(args.fractions))
        val_n = {q: fraction_scores(normal, q) for q in qs}
        val_d = {q: fraction_scores(defect, q) for q in qs}
        test_s = {q: fraction_scores(test, q) for q in qs}
        counts = {name: int(((areas >= lo) & (areas < hi)).sum()) for name, lo, hi in SIZES}
        rows = []
        for q in args.fractions:
            rows.append({"score": f"top {q}" if q else "max", **by_size(val_n[q], val_d[q], areas),
                         "test": auroc(test_s[q][labels == 0], test_s[q][labels == 1])})
        half = np.arange(len(normal)) % 2 == 0
        for m in multis:
            parts = []
            for ref, judged in ((half, ~half), (~half, half)):
                ref_scores = {q: val_n[q][ref] for q in m}
                parts.append(by_size(standardised({q: val_n[q][judged] for q in m}, ref_scores),
                                     standardised({q: val_d[q] for q in m}, ref_scores), areas))
            row = {"score": "multi " + "+".join(str(q) for q in m)}
            for key in parts[0]:
                vals = [p[key] for p in parts if p[key] is not None]
                row[key] = round(float(np.mean(vals)), 4) if vals else None
            t = standardised({q: test_s[q] for q in m}, {q: val_n[q] for q in m})
            row["test"] = auroc(t[labels == 0], t[labels == 1])
            rows.append(row)
        for row in rows:
            emit({"data": name, "method": args.method, "seed": seed, **row, "n_normal": len(normal),
                  "n_defects": counts}, args.out)
        print(f"done {name} seed {seed}", file=sys.stderr)


if __name__ == "__main__":
    main()
