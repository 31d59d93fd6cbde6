"""Evaluate a detector on a dataset path: choose the honest images, score them, compute metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insightad.config import DataParams
from insightad.data.images import check_mask_size
from insightad.data.layouts import Sample, discover, evaluation_samples
from insightad.evaluate.metrics import image_metrics
from insightad.evaluate.pixel import RESOLUTION, pixel_metrics, resize_map
from insightad.methods import Detector, Prediction


@dataclass
class Evaluation:
    samples: list[Sample]
    prediction: Prediction
    metrics: dict[str, Any]


def predict_reduced(det: Detector, paths: list, maps: bool, threshold: float | None, progress: bool,
                    chunk: int = 32) -> tuple[Prediction, list[tuple[int, int]]]:
    """Predict a chunk at a time, keeping each map only at the pixel metrics' resolution, so memory
    does not grow with the number and size of test images. Returns the prediction and image sizes."""
    from tqdm import tqdm

    parts, sizes, reduced = [], [], []
    for start in tqdm(range(0, len(paths), chunk), desc="evaluate", unit="chunk", disable=not progress, leave=False):
        p = det.predict(paths[start:start + chunk], maps=maps, threshold=threshold)
        parts.append(p)
        if p.maps is not None:
            sizes.extend(m.shape for m in p.maps)
            reduced.extend(resize_map(m, RESOLUTION).astype(np.float32) for m in p.maps)
    scores = np.concatenate([p.scores for p in parts])
    pred = Prediction(scores, reduced if maps else None, parts[0].threshold,
                      np.concatenate([p.labels for p in parts]),
                      np.concatenate([p.scores_normalized for p in parts]) if parts[0].scores_normalized is not None
                      else None)
    return pred, sizes


def evaluate_model(det: Detector, data: str | Path, dp: DataParams, threshold: float | None = None,
                   progress: bool = True) -> Evaluation:
    """Score the held-out/test images of ``data`` (never training images) and compute metrics.

    Maps in the returned prediction are at the pixel metrics' resolution (256 px), not the inputs'.
    """
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    samples = evaluation_samples(ds, getattr(det, "split_", None))
    for s in samples:  # before scoring, for every method: a wrong mask is a wrong dataset
        if s.mask is not None:
            check_mask_size(s.mask, s.path)
    want_maps = det.has_maps and any(s.mask is not None for s in samples)
    pred, sizes = predict_reduced(det, [s.path for s in samples], want_maps, threshold, progress)
    labels = np.array([s.label for s in samples])
    m = image_metrics(labels, pred.scores, pred.threshold)
    m["method"] = det.method
    m["threshold_strategy"] = det.threshold_strategy_ if threshold is None else "override"
    if want_maps:
        m.update(pixel_metrics(samples, pred.maps, shapes=sizes))
    return Evaluation(samples, pred, m)
