#!/usr/bin/env python
"""Backbone sweep: baseline, PaDiM and PatchCore image AUROC per backbone, image size, levels and seed,
each dataset's images through the backbone once.

Every image of a dataset goes through the backbone once (levels 1-4, the method's own preprocessing,
PyTorch engine); then, for every seed and variant, the methods' own ``fit`` runs on the cached
features of that seed's training images (the detector's batches and feature runner are replaced by a
look-up into the cache, nothing else: Gaussians, coreset, bank and threshold are the methods' code)
and the test images are scored by the fitted model's own scoring functions. The split is
``insightad train``'s (holdout 0.2 for crack-style sets, MVTec's test split otherwise). Image AUROC
and, where masks exist, pixel AUROC of the model-size maps (``insightad.evaluate.pixel`` at 256 px;
``bench.py`` brings maps to full size first, so its pixel figures can differ in the third decimal).
For speed, model size and memory use ``bench.py`` (the whole pipeline, a fresh process per run).

One JSON line per (dataset, backbone, image size, method, variant, seed); a table on stderr.

    python benchmarks/backbone_sweep.py --data ../shared/data/concrete_crack --backbones \\
        tf_efficientnet_lite0 tf_efficientnet_lite2 --seeds 0 1 2 --out benchmarks/results/lite2-sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from insightad.data.layouts import discover, evaluation_samples, holdout_split
from insightad.evaluate.pixel import RESOLUTION, resize_map
from insightad.methods import create_detector
from insightad.methods.components.pooling import pool
from insightad.methods.padim import level_patches

LEVELS = (1, 2, 3, 4)
# variant name -> (method, extra params); methods' defaults otherwise
VARIANTS = {
    "baseline": ("baseline", {}),
    "padim": ("padim", {}),
    "patchcore": ("patchcore", {}),
    "baseline_l234": ("baseline", {"layers": [2, 3, 4]}),
    "padim_l23": ("padim", {"layers": [2, 3]}),
    "patchcore_l123": ("patchcore", {"layers": [1, 2, 3]}),
}


def cache_features(paths: list[Path], backbone: str, size: int, batch: int) -> tuple[dict[int, torch.Tensor], float]:
    """Levels 1-4 of every image, through a detector's own batches and feature runner (torch engine)."""
    det = create_detector("padim", backbone=backbone, image_size=size, batch_size=batch, layers=list(LEVELS),
                          fit_engine="torch", device="cpu", workers=0)
    det.device_ = torch.device("cpu")
    features = det._feature_runner(det._make_extractor())
    out: dict[int, list[torch.Tensor]] = {lv: [] for lv in LEVELS}
    t = time.perf_counter()
    with torch.inference_mode():
        for b in det._batches(paths, False, "cache"):
            for lv, f in zip(LEVELS, features(b.images)):
                out[lv].append(f.float().contiguous())
    return {lv: torch.cat(v) for lv, v in out.items()}, len(paths) / (time.perf_counter() - t)


def fit_on_cache(method: str, params: dict, cache: dict[int, torch.Tensor], train_idx: list[int], batch: int):
    """The method's own fit, its batches and feature runner replaced by look-ups into the cache."""
    det = create_detector(method, **params)
    layers = det.feature_layers()

    def batches(images, progress, desc, strict=True):
        images = list(images)
        for i in range(0, len(images), batch):
            yield SimpleNamespace(images=torch.tensor(images[i:i + batch]))

    det._batches = batches
    det._feature_runner = lambda extractor: (lambda idx: [cache[lv][idx] for lv in layers])
    t = time.perf_counter()
    det.fit(train_idx)
    return det, time.perf_counter() - t


def score_on_cache(det, cache: dict[int, torch.Tensor], test_idx: list[int], batch: int):
    """(image scores, maps at model size or None) from the fitted model's own scoring functions."""
    model, layers = det.model_, det.feature_layers()
    scores, maps = [], []
    with torch.inference_mode():
        for i in range(0, len(test_idx), batch):
            feats = [cache[lv][torch.tensor(test_idx[i:i + batch])] for lv in layers]
            if det.method == "padim":
                s, m = model.score_embeddings(model.reduce(level_patches(feats)))
            elif det.method == "patchcore":
                s, m = model.score_patches(model.patches_from_levels(feats))
            else:
                s, m = model.score_embeddings(pool(feats, det.pooling)), None
            scores.append(s.float())
            if m is not None:
                maps.extend(m.float().numpy())
    return torch.cat(scores).numpy(), (maps or None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", type=Path, required=True)
    p.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
    p.add_argument("--image-sizes", type=int, nargs="+", default=[256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["baseline", "padim", "patchcore"], choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for data in args.data:
        ds = discover(data)
        paths = sorted({s.path for s in ds.samples})
        index = {q: i for i, q in enumerate(paths)}
        for backbone in args.backbones:
            for size in args.image_sizes:
                cache, ips = cache_features(paths, backbone, size, args.batch_size)
                print(f"# {data.name} {backbone} {size}px: {len(paths)} images cached at {ips:.2f} images/s",
                      file=sys.stderr, flush=True)
                for seed in args.seeds:
                    train, held = holdout_split(ds, 0.2, seed)
                    split = {"root": str(ds.root), "train": [ds.rel(s.path) for s in train],
                             "holdout": [ds.rel(s.path) for s in held]}
                    test = evaluation_samples(ds, split)
                    labels = np.array([s.label for s in test])
                    for variant in args.variants:
                        method, extra = VARIANTS[variant]
                        params = {"backbone": backbone, "image_size": size, "seed": seed, "device": "cpu",
                                  "batch_size": args.batch_size, "fit_engine": "torch", "workers": 0, **extra}
                        det, fit_s = fit_on_cache(method, params, cache, [index[s.path] for s in train],
                                                  args.batch_size)
                        scores, maps = score_on_cache(det, cache, [index[s.path] for s in test], args.batch_size)
                        row = {"data": data.name, "backbone": backbone, "image_size": size, "variant": variant,
                               "method": method, "params": extra, "seed": seed,
                               "image_auroc": round(float(roc_auc_score(labels, scores)), 5),
                               "pixel_auroc": None, "fit_s_cached": round(fit_s, 1), "backbone_ips": round(ips, 2)}
                        if maps is not None and any(s.mask is not None for s in test):
                            from insightad.data.images import image_size
                            from insightad.evaluate.pixel import pixel_metrics

                            # maps are at model size: compared at 256 px (resized there if the size differs)
                            maps = [resize_map(m, RESOLUTION) for m in maps]
                            shapes = [image_size(s.path)[::-1] for s in test]
                            pm = pixel_metrics(test, maps, shapes=shapes)
                            row["pixel_auroc"] = round(pm["pixel_auroc"], 5)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.out:
                            with args.out.open("a") as f:
                                f.write(json.dumps(row) + "\n")
                del cache
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["backbone"], r["image_size"], r["variant"]), []).append(r)
    for (data, bb, size, variant), rs in groups.items():
        v = [r["image_auroc"] for r in rs]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        px = [r["pixel_auroc"] for r in rs if r["pixel_auroc"] is not None]
        print(f"{data:<16} {bb:<22} {size:>4} {variant:<16} {statistics.fmean(v):.3f} ± {sd:.3f} (n={len(v)})"
              + (f"  pixel {statistics.fmean(px):.3f}" if px else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
