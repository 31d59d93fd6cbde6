"""Is there anything to decide? Scores that are (nearly) all equal make any threshold meaningless."""

from __future__ import annotations

import numpy as np

CONSTANT_RTOL = 1e-4  # spread of the scores, relative to their size, below which they count as constant


class ConstantScoresWarning(UserWarning):
    """The scores a threshold was chosen on are (nearly) all the same: the model does not tell images apart."""


def constant_scores_message(scores: np.ndarray, threshold: float, what: str = "validation") -> str | None:
    """A one-line warning when ``scores`` are (nearly) constant, else None (numpy only)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < 2:
        return None
    spread = float(s.max() - s.min())
    size = max(float(np.abs(s).max()), 1e-12)
    if spread > CONSTANT_RTOL * size:
        return None
    return (f"the {s.size} {what} scores are (nearly) all equal ({float(np.median(s)):.6g}, spread {spread:.3g}), "
            f"so the threshold {threshold:.6g} decides nothing: the model does not tell images apart "
            "(train longer, or choose another method)")
