"""Threshold strategies. Every one returns the value, its name, what it was computed from, and warnings.

The decision everywhere is ``anomalous = score > threshold``. The F1 and Youden strategies sweep
every distinct score and put the threshold half-way between two consecutive ones, so the chosen
value separates the images the same way however the comparison is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from insightad.errors import InsightADError

STRATEGIES = ("percentile", "f1", "youden")


@dataclass
class ThresholdChoice:
    """A threshold, the strategy that chose it, the figures behind it, and anything the user should know."""

    value: float
    strategy: str
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def min_normals_for(percentile: float) -> int:
    """Normal images needed before the ``percentile``-th percentile is more than the largest score:
    with n images, on average n * (100 - p) / 100 lie above it, which should be at least one."""
    if percentile >= 100:
        return 1
    return max(1, math.ceil(100.0 / (100.0 - percentile) - 1e-9))


def _finite(scores: np.ndarray, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise InsightADError(f"{what}: {int((~np.isfinite(s)).sum())} scores are not finite numbers")
    return s


def percentile_threshold(normal_scores: np.ndarray, percentile: float = 95.0) -> ThresholdChoice:
    """The ``percentile``-th percentile of scores of normal images the model was not trained on."""
    if not 0 <= percentile <= 100:
        raise InsightADError(f"percentile: expected a value between 0 and 100, got {percentile!r}")
    s = _finite(normal_scores, "percentile")
    if s.size == 0:
        raise InsightADError("percentile: no normal images to calibrate on")
    value = float(np.percentile(s, percentile))
    warnings = []
    need = min_normals_for(percentile)
    if s.size < need:
        warnings.append(f"only {s.size} normal images for the {percentile:g}th percentile: at least {need} are "
                        f"needed for it to mean more than 'about the largest normal score'; the threshold is "
                        "uncertain (add normal images, or ask for a lower percentile)")
    details = {"percentile": float(percentile), "n_normal": int(s.size),
               "false_alarm_rate": float((s > value).mean())}
    return ThresholdChoice(value, "percentile", details, warnings)


def _sweep(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds (flag nothing, then each distinct score and above), with TP and FP counts."""
    order = np.sort(np.unique(scores))[::-1]  # distinct scores, high to low
    below = np.append(order[1:], order[-1] - max(1e-12, 1e-6 * (abs(order[-1]) + (order[0] - order[-1]))))
    cands = np.concatenate([[order[0]], (order + below) / 2.0])  # first: flags nothing (score > max is never true)
    pos, neg = scores[labels], scores[~labels]
    # for each candidate, how many positive / negative scores lie strictly above it
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tp = pos.size - np.searchsorted(pos_sorted, cands, side="right")
    fp = neg.size - np.searchsorted(neg_sorted, cands, side="right")
    return cands, tp.astype(np.float64), fp.astype(np.float64)


def _labelled(labels: np.ndarray, scores: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool)
    s = _finite(scores, strategy)
    if y.shape != s.shape:
        raise InsightADError(f"{strategy}: {y.size} labels for {s.size} scores")
    if not y.any() or y.all():
        missing = "defective" if not y.any() else "normal"
        raise InsightADError(f"{strategy}: needs both normal and defective images, found no {missing} ones "
                             "(use --strategy percentile when only normal images are available)")
    return y, s


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> ThresholdChoice:
    """The threshold with the best F1 score on these labelled images (ties: the higher threshold)."""
    y, s = _labelled(labels, scores, "f1")
    cands, tp, fp = _sweep(y, s)
    fn = y.sum() - tp
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    i = int(np.argmax(f1))
    details = {"f1": float(f1[i]), "precision": float(tp[i] / max(tp[i] + fp[i], 1)),
               "recall": float(tp[i] / y.sum()), "n_normal": int((~y).sum()), "n_anomalous": int(y.sum())}
    return ThresholdChoice(float(cands[i]), "f1", details, _few_warning(y))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> ThresholdChoice:
    """The ROC point farthest above the diagonal: max TPR - FPR (Youden's J; ties: the higher threshold)."""
    y, s = _labelled(labels, scores, "youden")
    cands, tp, fp = _sweep(y, s)
    tpr, fpr = tp / y.sum(), fp / (~y).sum()
    j = tpr - fpr
    i = int(np.argmax(j))
    details = {"youden_j": float(j[i]), "tpr": float(tpr[i]), "fpr": float(fpr[i]),
               "n_normal": int((~y).sum()), "n_anomalous": int(y.sum())}
    return ThresholdChoice(float(cands[i]), "youden", details, _few_warning(y))


def _few_warning(y: np.ndarray, minimum: int = 10) -> list[str]:
    few = [f"{n} {what}" for n, what in (((~y).sum(), "normal"), (y.sum(), "defective")) if n < minimum]
    if few:
        return [f"only {' and '.join(few)} images: a threshold fitted to so few labelled images is uncertain"]
    return []


def choose_threshold(strategy: str, scores: np.ndarray, labels: np.ndarray | None = None,
                     percentile: float = 95.0) -> ThresholdChoice:
    """Dispatch by name; ``percentile`` uses only the normal images (label 0, or all when no labels)."""
    scores = np.asarray(scores, dtype=np.float64)
    if strategy == "percentile":
        normal = scores if labels is None else scores[~np.asarray(labels).astype(bool)]
        return percentile_threshold(normal, percentile)
    if labels is None:
        raise InsightADError(f"{strategy}: needs labelled normal and defective images")
    if strategy == "f1":
        return f1_threshold(labels, scores)
    if strategy == "youden":
        return youden_threshold(labels, scores)
    raise InsightADError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")


@dataclass(frozen=True)
class FitPolicy:
    """How a method's end-of-fit scores become its default threshold.

    ``source`` names the scores (``train_loo``, ``holdout``, ``val``, ``train``, ...); the threshold is
    their ``percentile``-th percentile, unless the method's own maths fixes it (``fixed``, e.g. the
    soft-boundary SVDD radius, named ``fixed_name``).
    """

    source: str
    percentile: float = 99.0
    fixed: float | None = None
    fixed_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def threshold_from_fit(decision_scores: np.ndarray, policy: FitPolicy) -> ThresholdChoice:
    """The single end-of-fit step (PyOD's): scores of normal images -> threshold, strategy name, and the
    spread that ``score_normalized`` uses."""
    from insightad.decide.normalize import robust_scale

    s = _finite(decision_scores, "fit")
    if s.size == 0:
        raise InsightADError("fit: no scores of normal images to set a threshold from")
    if policy.fixed is not None:
        value, strategy = float(policy.fixed), policy.fixed_name
    else:
        value = float(np.percentile(s, policy.percentile))
        strategy = f"{policy.source}_p{policy.percentile:g}"
    details = {"n": int(s.size), "scale": robust_scale(s, value), **policy.extra}
    return ThresholdChoice(value, strategy, details)
