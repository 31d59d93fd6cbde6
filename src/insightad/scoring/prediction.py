"""The answer of every scorer: raw scores, maps at each input's resolution, decisions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """Scores (raw, one per image), maps at each input's resolution (or None), and decisions."""

    scores: np.ndarray
    maps: list[np.ndarray | None] | None = None  # None for an image that could not be read (strict=False)
    threshold: float | None = None
    labels: np.ndarray | None = None  # True = anomalous, once a threshold is known
    scores_normalized: np.ndarray | None = None  # extra field; never replaces ``scores``
    errors: dict[int, str] = field(default_factory=dict)  # index -> message (non-strict runs; score NaN)
    offset: int = 0  # index of the first image in the whole input (chunks of ``iter_predict``)

    def __len__(self) -> int:
        return len(self.scores)

    def record(self, i: int) -> dict[str, Any]:
        """One image's answer, the same in every machine-readable output (CLI JSON, CSV, HTTP):
        score, score_normalized, threshold, anomalous, error."""
        err = self.errors.get(i)
        score = float(self.scores[i])
        ok = err is None and np.isfinite(score)
        norm = float(self.scores_normalized[i]) if ok and self.scores_normalized is not None else None
        return {"score": score if ok else None, "score_normalized": norm, "threshold": self.threshold,
                "anomalous": bool(self.labels[i]) if ok and self.labels is not None else None,
                "error": err}

    @property
    def anomalous(self) -> np.ndarray | None:
        """The decisions as booleans (True = anomalous): the name every machine-readable output uses."""
        return None if self.labels is None else np.asarray(self.labels, dtype=bool)

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        """Chunks (in order) -> one Prediction over all of them."""
        if not parts:
            return Prediction(np.empty(0))
        maps = None if parts[0].maps is None else [m for p in parts for m in (p.maps or [])]
        cat = (lambda k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts]))
        errors = {p.offset - parts[0].offset + i: e for p in parts for i, e in p.errors.items()}
        return Prediction(np.concatenate([p.scores for p in parts]), maps, parts[0].threshold, cat("labels"),
                          cat("scores_normalized"), errors, parts[0].offset)


def non_finite_message(source: Any, score: float) -> str:
    """One line for an image the model scored NaN or infinity (a model fault, not a verdict)."""
    source = getattr(source, "path", source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    return f"{name}: the model's score is {score} (not a finite number); no verdict for this image"
