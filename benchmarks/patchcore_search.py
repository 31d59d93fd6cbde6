#!/usr/bin/env python
"""PatchCore nearest-neighbour search: exact (torch, what the ONNX graph does) against HNSW (faiss).

Trains PatchCore once on an MVTec category (default coreset 10%), then on its test images reports:
recall@1 of HNSW against exact search over every test patch, search milliseconds per image alone
(on 16 images; HNSW's with and without making each image's largest distance exact),
warm predict images/s (scores and maps at model size; decoded batches in memory, and whole
``predict`` with decoding), the backbone alone on the same engine (the ceiling), and image / pixel
AUROC with each search. One JSON line.

    python benchmarks/patchcore_search.py --data ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeat: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--coreset", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--searches", nargs="+", default=["exact", "hnsw"], help="searches whose predict speed and "
                   "AUROC to measure (recall and search timings always compare both)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from insightad.apps.train import train_model
    from insightad.config import DataParams
    from insightad.data.layouts import discover
    from insightad.data.loader import iter_batches
    from insightad.evaluate.run import evaluate_model
    from insightad.methods.components.knn import HnswIndex, exact_maxima, nearest
    from insightad.model_file import load_model

    dp = DataParams(seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train_model(args.data, "patchcore", {"coreset_ratio": args.coreset, "seed": args.seed, "device": "cpu",
                                             "search": "exact"}, dp, Path(tmp) / "m.safetensors", progress=False)
        fit_s = time.perf_counter() - t
        det = load_model(Path(tmp) / "m.safetensors")
    model = det.model_
    test = [s.path for s in discover(args.data).test]
    batches = [np.stack(b.images) for b in iter_batches(test, det.preprocessing_, 16, 0)]  # as forward_batch takes them
    with torch.inference_mode():
        patches = torch.cat([model.patches(torch.from_numpy(x)) for x in batches])  # (N, P, D)
    q = patches.flatten(0, 1)
    n_img = patches.shape[0]
    t = time.perf_counter()
    index = HnswIndex(model.bank)
    build_s = time.perf_counter() - t
    sub = patches[:16]  # search timings on 16 images' patches (exact search is slow on a loaded machine)
    with torch.inference_mode():
        d_exact, i_exact = nearest(q, model.bank)
        d_hnsw, i_hnsw = index.search(q)
        exact_ms = timed(lambda: nearest(sub.flatten(0, 1), model.bank), 1) * 1000 / len(sub)
        hnsw_ms = timed(lambda: index.search(sub.flatten(0, 1))) * 1000 / len(sub)
        refine_ms = timed(lambda: exact_maxima(sub, *(t.view(len(sub), -1) for t in index.search(sub.flatten(0, 1))),
                                               model.bank)) * 1000 / len(sub) - hnsw_ms
    same = (i_exact == i_hnsw) | (d_hnsw <= d_exact + 1e-5)  # a tie at the same distance is a hit
    out = {"data": args.data.name, "coreset": args.coreset, "seed": args.seed, "bank": list(model.bank.shape),
           "patches_per_image": patches.shape[1], "fit_s": round(fit_s, 1), "hnsw_build_s": round(build_s, 2),
           "recall_at_1": round(float(same.float().mean()), 5),
           "max_rel_distance_error": round(float(((d_hnsw - d_exact) / d_exact.clamp_min(1e-12)).max()), 5),
           "search_ms_per_image": {"exact": round(exact_ms, 2), "hnsw": round(hnsw_ms, 2),
                                   "hnsw_exact_maxima": round(refine_ms, 2)}, "threads": args.threads}
    det.forward_batch(batches[0])  # attaches the backbone runner predict uses
    if model.features is not None:
        features = model.features
        out["backbone_ips"] = round(n_img / timed(lambda: [features(torch.from_numpy(x)) for x in batches]), 2)
    for search in args.searches:
        model.search = search
        det.forward_batch(batches[0])  # warm (builds the index)
        out[f"forward_ips_{search}"] = round(n_img / timed(lambda: [det.forward_batch(x) for x in batches], 1), 2)
        out[f"predict_ips_{search}"] = round(n_img / timed(lambda: det.predict(test, maps=True)), 2)
        m = evaluate_model(det, args.data, dp, progress=False).metrics
        out[f"image_auroc_{search}"] = round(m["image_auroc"], 5)
        out[f"pixel_auroc_{search}"] = round(m["pixel_auroc"], 5)
    line = json.dumps(out)
    print(line)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
