"""Threshold files: a decision threshold saved as JSON, tied to the model it was chosen for.

The web page's "export" and ``insightad calibrate --out`` write them; ``predict``, ``sort``,
``evaluate`` and ``serve`` read them with ``--threshold FILE.json``. A file that names a model
(``model_sha256``, the SHA-256 of the model file's bytes) is refused for any other model: a
threshold is only meaningful on the score scale of the model it was chosen on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from insightad.decide.labels import file_sha256
from insightad.errors import InsightADError

__all__ = ["file_sha256", "read_threshold_file"]


def read_threshold_file(path: str | Path, model: str | Path | None = None) -> float:
    """The ``threshold`` of a JSON threshold file; refused when its ``model_sha256`` is not ``model``'s."""
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        value = float(data["threshold"] if isinstance(data, dict) else data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise InsightADError(f"{path}: expected JSON with a numeric 'threshold' field") from None
    if not math.isfinite(value):
        raise InsightADError(f"{path}: threshold must be a finite number, got {value!r}")
    wanted = data.get("model_sha256") if isinstance(data, dict) else None
    if wanted is not None and model is not None and Path(model).is_file():
        actual = file_sha256(model)
        if str(wanted).lower() != actual:
            raise InsightADError(f"{path}: this threshold was chosen for another model (model_sha256 "
                                 f"{str(wanted)[:12]}..., but {Path(model).name} has {actual[:12]}...); "
                                 "choose a threshold for this model")
    return value
