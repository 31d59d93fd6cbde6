"""Evaluate a detector on a dataset path: choose the honest images, score them, compute metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insightad.config import DataParams
from insightad.data.layouts import Sample, discover, evaluation_samples
from insightad.evaluate.metrics import image_metrics
from insightad.methods import Detector, Prediction


@dataclass
class Evaluation:
    samples: list[Sample]
    prediction: Prediction
    metrics: dict[str, Any]


def evaluate_model(det: Detector, data: str | Path, dp: DataParams, threshold: float | None = None,
                   progress: bool = True) -> Evaluation:
    """Score the held-out/test images of ``data`` (never training images) and compute metrics."""
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    samples = evaluation_samples(ds, getattr(det, "split_", None))
    want_maps = det.has_maps and any(s.mask is not None for s in samples)
    pred = det.predict([s.path for s in samples], maps=want_maps, progress=progress, threshold=threshold)
    labels = np.array([s.label for s in samples])
    m = image_metrics(labels, pred.scores, pred.threshold)
    m["method"] = det.method
    m["threshold_strategy"] = det.threshold_strategy_ if threshold is None else "override"
    if want_maps:
        try:
            from insightad.evaluate import pixel  # added with the map methods
        except ImportError:
            m["pixel_note"] = "pixel metrics unavailable: insightad.evaluate.pixel is not part of this build"
        else:
            m.update(pixel.pixel_metrics(samples, pred.maps))
    return Evaluation(samples, pred, m)
