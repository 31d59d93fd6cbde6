"""Image-level metrics (scikit-learn), with undefined cases reported as None rather than crashing."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

# Why a metric is None, in the words the table, the report and --json readers see (pixel metrics carry their own
# reason in ``pixel_undefined``).
UNDEFINED_BECAUSE = {"precision": "no image was called anomalous", None: "needs normal and anomalous images"}


def undefined_text(m: dict, key: str) -> str:
    """``n/a (why)`` for a metric of ``m`` that is None."""
    if key in ("pixel_auroc", "aupro", "pixel_ap") and m.get("pixel_undefined"):
        return f"n/a ({m['pixel_undefined']})"
    return f"n/a ({UNDEFINED_BECAUSE.get(key, UNDEFINED_BECAUSE[None])})"


def pixel_coverage(m: dict) -> str:
    """How many images the pixel metrics judged, and why the others were left out."""
    empty = int(m.get("pixel_images_empty_mask") or 0)
    unmasked = int(m.get("pixel_images_skipped") or 0) - empty
    return (f"{m.get('pixel_images', 0)} images judged pixel by pixel"
            + (f"; {unmasked} anomalous images without a mask left out" if unmasked else "")
            + (f"; {empty} anomalous images whose mask marks no defect pixel left out" if empty else ""))


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int | list[float] | None]:
    """AUROC, average precision, and accuracy/precision/recall/F1 of ``score > threshold``."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    both = labels.any() and (~labels).any()
    pred = scores > threshold
    out: dict[str, float | int | list[float] | None] = {
        "image_auroc": float(skm.roc_auc_score(labels, scores)) if both else None,
        # with anomalous images only, every ranking has precision 1: undefined, as AUROC is, not a perfect 1.0
        "average_precision": float(skm.average_precision_score(labels, scores)) if both else None,
        "accuracy": float(skm.accuracy_score(labels, pred)),
        # undefined (None, printed n/a) when no image is called anomalous: 0/0, not a precision of 0
        "precision": float(skm.precision_score(labels, pred, zero_division=0)) if pred.any() else None,
        "recall": float(skm.recall_score(labels, pred, zero_division=0)) if labels.any() else None,
        "f1": float(skm.f1_score(labels, pred, zero_division=0)) if labels.any() else None,
        "threshold": float(threshold),
        "n_normal": int((~labels).sum()),
        "n_anomalous": int(labels.sum()),
    }
    out.update(decision_gap(labels, scores, threshold))
    return out


def decision_gap(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | list[float] | None]:
    """The best F1 any threshold reaches here (as anomalib reports it) and where, next to the false-alarm
    rate of ``threshold`` on these normals with its Wilson 95% interval: how far the default decision
    is from the best possible one."""
    from insightad.decide.decisions import wilson_interval
    from insightad.decide.thresholds import f1_threshold

    normal = scores[~labels]
    out: dict[str, float | list[float] | None] = {"f1_max": None, "threshold_f1_max": None}
    if labels.any() and (~labels).any():
        best = f1_threshold(labels, scores)
        out["f1_max"], out["threshold_f1_max"] = float(best.details["f1"]), float(best.value)
    false_alarms = int((normal > threshold).sum())
    out["false_alarm_rate"] = float(false_alarms / normal.size) if normal.size else None
    out["false_alarm_interval"] = list(wilson_interval(false_alarms, normal.size)) if normal.size else None
    return out
