"""Sweep of a model's life after training: calibrate, export, info, predict and evaluate on model files and ONNX
exports, threshold files, the graph beside a model, and the runtime-only install (no PyTorch).

Each test failed before its fix and passes after it."""

from __future__ import annotations

import pytest

from insightad.cli import main


@pytest.mark.parametrize("value, expected", [("-1e-3", "(threshold -0.001)"), ("-5.", "(threshold -5)"),
                                             ("-.5E1", "(threshold -5)")])
def test_p45_negative_numbers_in_any_spelling_are_values(value, expected, baseline_model, mvtec_dir, capsys):
    """argparse reads only -5 and -0.5 as numbers: ``--threshold -1e-3`` stopped with 'expected one argument'."""
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--threshold", value, str(image)]) == 0
    out = capsys.readouterr().out
    assert expected in out and "ANOMALOUS" in out


@pytest.mark.parametrize("value", ["-inf", "-NaN", "-Infinity"])
def test_p45_negative_infinity_is_refused_as_not_finite(value, baseline_model, mvtec_dir, capsys):
    """``--threshold -inf`` was 'expected one argument' (as if no value were given), not the finite-number rule."""
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--threshold", value, str(image)]) == 1
    assert f"--threshold: expected a finite number, got {value!r}" in capsys.readouterr().err
