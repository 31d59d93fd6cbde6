"""Sweep of train, calibrate and evaluate on odd datasets: file names that are not UTF-8 in a report, masks
whose defect values are small or constant, negative seeds, undefined pixel metrics explained, copies of
training images named, identical training images refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main


def _odd_names_dataset(mvtec_dir: Path, root: Path) -> Path:
    """A folder-layout copy of ``mvtec_dir``'s test split whose defect folder and one image are named with bytes
    that are not UTF-8 (as a Windows-1252 or Shift-JIS camera PC writes them)."""
    shutil.copytree(mvtec_dir / "test" / "good", root / "normal")
    defect = os.path.join(os.fsencode(root / "abnormal"), b"rayure\xe9")
    os.makedirs(defect)
    for i, src in enumerate(sorted(p for d in (mvtec_dir / "test").iterdir() if d.name != "good"
                                   for p in d.glob("*.png"))[:4]):
        shutil.copy(src, os.path.join(defect, b"pi\xe8ce %d.png" % i))
    return root


def test_p41_report_with_names_that_are_not_utf8(baseline_model, mvtec_dir, tmp_path, capsys):
    data = _odd_names_dataset(mvtec_dir, tmp_path / "data")
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--report", str(report),
                 "--no-progress"]) == 0
    assert "report written to" in capsys.readouterr().out
    assert {"metrics.json", "report.md", "per_defect.csv", "worst_cases.png"} <= {p.name for p in report.iterdir()}
    assert "rayure\\xe9" in (report / "per_defect.csv").read_text(encoding="utf-8")
