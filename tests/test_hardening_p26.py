"""Issue 12 point 26: precision is undefined (n/a, JSON null) when no image is called anomalous, never 0.0000."""

from __future__ import annotations

import json

import numpy as np

from insightad.cli import main
from insightad.evaluate.metrics import image_metrics


def test_p26_image_metrics_precision_undefined():
    m = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]), threshold=10.0)
    assert m["precision"] is None and m["recall"] == 0.0
    assert image_metrics(np.array([0, 1]), np.array([0.1, 0.4]), threshold=0.2)["precision"] == 1.0


def test_p26_evaluate_prints_na_and_null(baseline_model, mvtec_dir, capsys):
    argv = ["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--threshold", "1e9",
            "--engine", "torch"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] is None
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("precision "))
    assert "n/a" in line and "0.0000" not in line
