"""Decisions: choosing a threshold (percentile of normal scores, F1-optimal, ROC/Youden), applying it
to a model file (calibrate), and the normalised score that puts the threshold at 0.5."""

from insightad.decide.normalize import default_scale, normalize_scores, robust_scale
from insightad.decide.thresholds import (
                                         STRATEGIES,
                                         FitPolicy,
                                         ThresholdChoice,
                                         choose_threshold,
                                         f1_threshold,
                                         min_normals_for,
                                         percentile_threshold,
                                         threshold_from_fit,
                                         youden_threshold,
)

__all__ = ["STRATEGIES", "FitPolicy", "ThresholdChoice", "choose_threshold", "default_scale", "f1_threshold",
           "min_normals_for", "normalize_scores", "percentile_threshold", "robust_scale", "threshold_from_fit",
           "youden_threshold"]
