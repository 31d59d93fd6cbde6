"""Image-level metrics (scikit-learn), with undefined cases reported as None rather than crashing."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """AUROC, average precision, and accuracy/precision/recall/F1 of ``score > threshold``."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    both = labels.any() and (~labels).any()
    pred = scores > threshold
    out: dict[str, float | int | None] = {
        "image_auroc": float(skm.roc_auc_score(labels, scores)) if both else None,
        "average_precision": float(skm.average_precision_score(labels, scores)) if labels.any() else None,
        "accuracy": float(skm.accuracy_score(labels, pred)),
        # undefined (None, printed n/a) when no image is called anomalous: 0/0, not a precision of 0
        "precision": float(skm.precision_score(labels, pred, zero_division=0)) if pred.any() else None,
        "recall": float(skm.recall_score(labels, pred, zero_division=0)) if labels.any() else None,
        "f1": float(skm.f1_score(labels, pred, zero_division=0)) if labels.any() else None,
        "threshold": float(threshold),
        "n_normal": int((~labels).sum()),
        "n_anomalous": int(labels.sum()),
    }
    return out
