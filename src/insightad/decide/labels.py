"""Operator labels for ``calibrate --labels FILE.csv``: read and check the file (numpy / stdlib only).

Two forms, told apart by their header:

- ``path,label``: images to score (a relative path is relative to the CSV's folder);
- ``name,label,score,model_sha256``: scores taken as given (e.g. exported by the web page), accepted
  only when ``model_sha256`` is the SHA-256 of the model file being calibrated.

``label`` is ``normal`` or ``anomalous``. An image listed twice with different labels (or, given scores,
different scores) is refused, and so are two paths of identical content (the same image copied) with
different labels; a row repeated exactly is counted once.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from insightad.errors import InsightADError
from insightad.io import (
    csv_value,
    file_sha256,  # noqa: F401 - re-exported for the page and calibrate
)

LABELS = {"normal": False, "anomalous": True}
PATH_FORM = ("path", "label")
SCORE_FORM = ("name", "label", "score", "model_sha256")


@dataclass
class LabelFile:
    """What a labels file says: names (paths or given names), labels (True = anomalous), scores if given."""

    source: Path
    form: str  # "paths" or "scores"
    names: list[str]
    labels: np.ndarray
    scores: np.ndarray | None = None
    model_sha256: str | None = None

    def paths(self) -> list[Path]:
        base = self.source.parent
        return [Path(n) if Path(n).is_absolute() else base / n for n in self.names]


def read_labels(path: str | Path) -> LabelFile:
    """Parse and check a labels CSV; every problem is one line naming the file, row and field."""
    from insightad.io import require_file

    path = require_file(path, "labels file")  # /dev/null or a FIFO was 'not found' (it is there, and no file)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = tuple(h.strip().lower() for h in (reader.fieldnames or ()))
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InsightADError(f"{path}: not a readable CSV file ({e})") from None
    if set(SCORE_FORM) <= set(header):
        form = "scores"
    elif set(PATH_FORM) <= set(header):
        form = "paths"
    else:
        raise InsightADError(f"{path}: expected the columns {','.join(PATH_FORM)} or {','.join(SCORE_FORM)}, "
                             f"got {','.join(header) or 'none'}")
    if not rows:
        raise InsightADError(f"{path}: no labelled rows")
    names, labels, scores, hashes, numbers = [], [], [], set(), []
    first: dict[str, tuple[int, bool, float | None]] = {}  # image -> (row, label, score) of its first row
    for r in rows:  # a name written after a ' so that a spreadsheet does not run it (the page's export)
        for key in ("name", "path"):
            if key in r:
                r[key] = csv_value(r[key])
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        lab = r.get("label", "").lower()
        if lab not in LABELS:
            raise InsightADError(f"{path}: row {i}: label expected normal or anomalous, got {r.get('label')!r}")
        key = "name" if form == "scores" else "path"
        if not r.get(key):
            raise InsightADError(f"{path}: row {i}: empty {key}")
        score = _row_score(path, i, r) if form == "scores" else None
        seen = _repeat_of(path, i, r[key], LABELS[lab], score, first, form)
        if seen:
            continue
        names.append(r[key])
        labels.append(LABELS[lab])
        numbers.append(i)
        if score is not None:
            scores.append(score)
            hashes.add(r.get("model_sha256", "").lower())
    if form == "paths":
        _refuse_same_content(path, names, labels, numbers)
    if len(hashes) > 1:
        raise InsightADError(f"{path}: rows name {len(hashes)} different model_sha256 values; scores from one model only")
    return LabelFile(path, form, names, np.array(labels, bool), np.array(scores) if form == "scores" else None,
                     hashes.pop() if hashes else None)


def _row_score(path: Path, row: int, r: dict[str, str]) -> float:
    """The ``score`` of a row of the scores form, or one line saying it is not a finite number."""
    try:
        s = float(r["score"])
    except ValueError:
        s = math.nan
    if not math.isfinite(s):
        raise InsightADError(f"{path}: row {row}: score expected a finite number, got {r['score']!r}")
    return s


def _repeat_of(path: Path, row: int, name: str, label: bool, score: float | None,
               first: dict[str, tuple[int, bool, float | None]], form: str) -> bool:
    """Whether this row repeats an image listed before (True: an exact repeat, skipped); an image listed
    again with another label or score is refused: one image cannot be both normal and anomalous. Paths
    are compared as the files they name (``a.png`` and ``./a.png`` are one image)."""
    key = str((path.parent / name).resolve()) if form == "paths" else name
    if key not in first:
        first[key] = (row, label, score)
        return False
    row0, label0, score0 = first[key]
    if label0 != label or score0 != score:
        what = "labels" if label0 != label else "scores"
        raise InsightADError(f"{path}: {name} is listed twice with different {what} (rows {row0} and {row}); "
                             "keep one row per image")
    return True


def _refuse_same_content(path: Path, names: list[str], labels: list[bool], rows: list[int]) -> None:
    """Refuse two listed files of identical content (sha256) with different labels: one image cannot be both
    normal and anomalous under two names. Files not found are left to the caller's check."""
    first: dict[str, tuple[int, str, bool]] = {}  # sha256 -> (row, name, label) of its first row
    for name, label, row in zip(names, labels, rows):
        file = path.parent / name
        if not file.is_file():
            continue
        digest = file_sha256(file)
        row0, name0, label0 = first.setdefault(digest, (row, name, label))
        if label0 != label:
            raise InsightADError(f"{path}: {name0} (row {row0}) and {name} (row {row}) are the same image "
                                 "(identical content) with different labels; keep one label per image")


def check_model_hash(labels: LabelFile, model_path: str | Path) -> None:
    """Refuse given scores computed by another model (another file, or this one since re-trained)."""
    if labels.form != "scores":
        return
    actual = file_sha256(model_path)
    if labels.model_sha256 != actual:
        raise InsightADError(f"{labels.source}: model_sha256 {(labels.model_sha256 or '')[:12] or '(empty)'}... is not the "
                             f"SHA-256 of {model_path} ({actual[:12]}...): these scores came from another model; "
                             "re-score the images (columns path,label) or use the matching model file")
