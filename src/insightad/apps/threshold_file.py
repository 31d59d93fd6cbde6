"""Threshold files: a decision threshold saved as JSON, tied to the model it was chosen for.

The web page's "export" and ``insightad calibrate --out`` write them; ``predict``, ``sort``,
``evaluate`` and ``serve`` read them with ``--threshold FILE.json``. A file that names a model
(``model_sha256``, the SHA-256 of the model file's bytes) is refused for any other model: a
threshold is only meaningful on the score scale of the model it was chosen on. An ONNX export is
taken as the model file it was exported from (the sha256 stamped in it). Files without
``model_sha256`` (written by calibrate before it recorded one) are accepted as they are.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from insightad.decide.labels import file_sha256
from insightad.errors import InsightADError

__all__ = ["file_sha256", "read_threshold_file"]


class FileThreshold(float):
    """A threshold read from a threshold file: the number itself, carrying the file's ``scale`` (the spread of
    ``score_normalized`` chosen with it by calibrate), so that wherever the threshold goes (a command's scoring,
    the server, batch's workers) ``score_normalized`` is the one the file was calibrated with, not the model's
    older scale (0.31 against 0.15 for one image before)."""

    scale: float | None

    def __new__(cls, value: float, scale: float | None = None) -> FileThreshold:
        obj = super().__new__(cls, value)
        obj.scale = scale
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole to batch's workers
        return (FileThreshold, (float(self), self.scale))


def _scale(path: Path, data: Any) -> float | None:
    """The file's ``scale`` (calibrate keeps it in ``details``): a positive finite number, or None where the file
    has none (a bare number, the page's export, files from before)."""
    if not isinstance(data, dict):
        return None
    details = data.get("details")
    raw = data.get("scale", details.get("scale") if isinstance(details, dict) else None)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
        raise InsightADError(f"{path}: 'scale' must be a positive JSON number, got {json.dumps(raw)[:40]}")
    return float(raw)


def read_threshold_file(path: str | Path, model: str | Path | None = None) -> FileThreshold:
    """The ``threshold`` of a JSON threshold file (with its ``scale``); refused when its ``model_sha256`` is not
    ``model``'s."""
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        raw = data["threshold"] if isinstance(data, dict) else data
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise InsightADError(f"{path}: expected JSON with a numeric 'threshold' field") from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):  # true would count as 1, "21.5" as a number
        raise InsightADError(f"{path}: 'threshold' must be a JSON number, got {json.dumps(raw)[:40]}")
    value = float(raw)
    if not math.isfinite(value):
        raise InsightADError(f"{path}: threshold must be a finite number, got {value!r}")
    wanted = data.get("model_sha256") if isinstance(data, dict) else None
    if wanted is not None and not (isinstance(wanted, str) and re.fullmatch(r"[0-9a-fA-F]{64}", wanted)):
        raise InsightADError(f"{path}: 'model_sha256' must be 64 hexadecimal digits (the model file's sha256), got "
                             f"{json.dumps(wanted)[:40]}")
    if wanted is not None and model is not None and Path(model).is_file():
        wanted = str(wanted).lower()
        actual = file_sha256(model)
        if wanted != actual and graph_source(model) != wanted:
            raise InsightADError(_not_for(path, data, model, wanted, actual))
    return FileThreshold(value, _scale(path, data))


def _not_for(path: Path, data: dict[str, Any], model: str | Path, wanted: str, actual: str) -> str:
    """Why a threshold file is refused for ``model``: chosen for another model file, or for this same file
    before it was rewritten (calibrated or trained again since: its scores may have another scale)."""
    chosen_for = data.get("model") or data.get("model_file")
    again = "choose a threshold for this model (insightad calibrate --model ... --out FILE.json)"
    if isinstance(chosen_for, str) and _same_file(chosen_for, model):
        return (f"{path}: this threshold was chosen for {model} as it was before it was rewritten (sha256 "
                f"{wanted[:12]}...; now {actual[:12]}...: calibrated or trained again since); {again}")
    return (f"{path}: this threshold was chosen for another model ({chosen_for or 'another model file'}, sha256 "
            f"{wanted[:12]}...), not for {model} (sha256 {actual[:12]}...); {again}")


def _same_file(recorded: str, model: str | Path) -> bool:
    """Whether the model path a threshold file records is the file at ``model`` now."""
    try:
        return Path(recorded).resolve() == Path(model).resolve()
    except (OSError, ValueError):  # a recorded path with a NUL byte or a link loop: not this file
        return False


def check_replaceable(path: str | Path, flag: str) -> None:
    """An output threshold file may replace only a threshold file: a name that is (or links to) a model file, an
    image or anything else is refused before any work (``calibrate --dry-run --out x.json``, x.json a link to
    the model, wrote JSON over the model while saying it was not changed)."""
    path = Path(path)
    if not path.exists() or path.is_dir() or path.stat().st_size == 0:
        return  # nothing to lose (a folder is refused by check_output_file)
    try:
        if path.stat().st_size > 10_000_000:  # a threshold file is a few kilobytes
            raise ValueError
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or "threshold" not in data:
            raise ValueError
    except (OSError, ValueError, RecursionError):
        target = path.resolve()
        what = f"links to {target}, which" if target != path.absolute() else "exists and"
        raise InsightADError(f"{path}: {flag} {what} is not a threshold file; writing one there would destroy it: "
                             "choose another name") from None


def graph_source(model: str | Path) -> str | None:
    """For an ONNX export: the sha256 of the model file it was exported from (its stamp), so a threshold
    file written for that model file also serves its graph; None for anything else."""
    from insightad.engines.onnx_runtime import is_onnx_file, read_stamp

    return read_stamp(model) if is_onnx_file(model) else None
