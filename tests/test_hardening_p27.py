"""Issue 12 point 27: warn when the scores a threshold is chosen on are (nearly) constant, and before a long
CPU training run, with its estimated time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from insightad.cli import main
from insightad.decide.spread import ConstantScoresWarning, constant_scores_message


def test_p27_constant_scores_message():
    assert constant_scores_message(np.full(20, 0.25098), 0.25098) is not None
    assert "nearly" in constant_scores_message(np.full(20, 0.25098) + np.arange(20) * 1e-9, 0.25098)
    assert constant_scores_message(np.linspace(0.2, 0.3, 20), 0.29) is None
    assert constant_scores_message(np.array([1.0]), 1.0) is None


def test_p27_fit_warns_on_constant_scores(mvtec_dir, monkeypatch):
    from insightad.methods.baseline import BaselineDetector

    fit = BaselineDetector._fit

    def constant_fit(self, images, progress):
        fit(self, images, progress)
        self.decision_scores_ = np.full(len(images), 0.25098)  # what a model that learned nothing gives

    monkeypatch.setattr(BaselineDetector, "_fit", constant_fit)
    images = sorted((mvtec_dir / "train" / "good").iterdir())[:6]
    with pytest.warns(ConstantScoresWarning, match="decides nothing"):
        BaselineDetector(image_size=32, backbone="test_efficientnet", weights="random").fit(images)


def test_p27_no_warning_for_a_normal_fit(mvtec_dir):
    from insightad.methods.baseline import BaselineDetector

    images = sorted((mvtec_dir / "train" / "good").iterdir())[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantScoresWarning)
        BaselineDetector(image_size=32, backbone="test_efficientnet", weights="random").fit(images)


def test_p27_long_cpu_run_is_announced_with_an_estimate(folder_dir, tmp_path, monkeypatch, capsys):
    from insightad.training import loop

    monkeypatch.setattr(loop, "LONG_RUN_S", 0.0)  # every run counts as long: the message is what is tested
    code = main(["train", "--method", "autoencoder", "--data", str(folder_dir), "--out", str(tmp_path / "ae.st"),
                 "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    line = next(x for x in err.splitlines() if "training on the CPU will take about" in x)
    assert line.startswith("insightad: warning: autoencoder") and "2 epochs x" in line and "--epochs" in line
