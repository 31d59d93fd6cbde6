"""``score_normalized``: a monotone map of the raw score that puts the decision threshold at 0.5.

    score_normalized = 1 / (1 + exp(-(score - threshold) / scale))

``scale`` is the spread of the normal scores the threshold was chosen on (at fit, train or
calibrate: the interquartile range of those scores divided by 1.349, i.e. their standard
deviation if they were Gaussian; their standard deviation when the IQR is zero). It is stored
with the threshold in the model file (``threshold.details.scale``). Where no spread was measured
``scale = |threshold| / 4`` (1 when the threshold is 0): a score at twice the threshold then maps
to 0.98, a score of 0 to 0.02.

So: above 0.5 = anomalous, exactly when ``score > threshold``; a normal image one spread below
the threshold reads about 0.27, one spread above reads 0.73. The raw score is always kept
alongside: the normalised one is an extra field, never a replacement.
"""

from __future__ import annotations

import numpy as np

IQR_TO_SIGMA = 1.349  # interquartile range of a standard normal distribution


def default_scale(threshold: float) -> float:
    """The scale used when none was measured: a quarter of the threshold's magnitude."""
    return abs(float(threshold)) / 4.0 if threshold else 1.0


def robust_scale(normal_scores: np.ndarray, threshold: float) -> float:
    """Spread of normal scores (IQR / 1.349, else standard deviation, else the default)."""
    s = np.asarray(normal_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size >= 2:
        q75, q25 = np.percentile(s, [75, 25])
        if q75 > q25:
            return float((q75 - q25) / IQR_TO_SIGMA)
        if s.std() > 0:
            return float(s.std())
    return default_scale(threshold)


def normalize_scores(scores: np.ndarray, threshold: float, scale: float | None = None) -> np.ndarray:
    """Logistic map of raw scores centred on ``threshold`` (NaN stays NaN)."""
    scale = float(scale) if scale and np.isfinite(scale) and scale > 0 else default_scale(threshold)
    z = (np.asarray(scores, dtype=np.float64) - float(threshold)) / scale
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow for large |z|
