"""Decisions through train, the model file, calibrate --labels and --method auto (cheap stub detectors)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from insightad.cli import main
from insightad.config import DataParams, DecisionParams
from insightad.errors import InsightADError
from insightad.model_file import load_model, read_metadata
from tests.mapdetector import NAME, MeanDeviationDetector, register_meandev


class NoiseModel(nn.Module):
    """Scores that ignore defects: a fixed pseudo-random function of the image sum."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return ((x.double().sum((1, 2, 3)) * 12.9898).sin().float(),)


class NoiseDetector(MeanDeviationDetector):
    method = "noise"
    has_maps = False

    def _fit(self, images, progress):
        super()._fit(images, progress)
        self.model_ = NoiseModel()


@pytest.fixture(scope="module")
def decided(mvtec_dir, tmp_path_factory):
    """A meandev model trained with the out-of-fold decision (held-out fold: 6 of 30 normals)."""
    from insightad.apps.train import train_model

    register_meandev()
    out = tmp_path_factory.mktemp("decided") / "m.safetensors"
    det, path, _ = train_model(mvtec_dir, NAME, {"image_size": 64}, DataParams(), out, progress=False,
                               decision=DecisionParams())
    return det, path


def test_decision_fields_round_trip_through_the_model_file(decided):
    det, path = decided
    rec = det.threshold_info_["decision"]
    assert det.threshold_strategy_ == "oof_fpr" and rec["validation"] == "heldout-fold (k=5)"
    assert rec["n_normal"] == 6 and rec["n_synthetic"] == 6 and 0 <= rec["synthetic_recall"] <= 1
    lo, hi = rec["false_alarm_interval"]
    assert lo <= rec["false_alarm_rate"] <= hi and rec["pixel_threshold"] is not None
    assert any("validation set is small" in w for w in rec["warnings"])
    back = load_model(path)
    assert back.threshold_ == det.threshold_ and back.threshold_info_["decision"] == rec
    assert back.threshold_info_["pixel_threshold"] == rec["pixel_threshold"]


def test_refit_folds_all_validates_every_training_normal(mvtec_dir, tmp_path):
    """--refit-folds all: a method validated by refitting (here the stub, as svdd and the autoencoder) is refitted
    on every fold, so every training normal is scored out of fold (30, not the held-out fold's 6); the exactly
    cross-fitted methods are unchanged; an ensemble passes it to its members' validations."""
    from insightad.apps.train import train_model
    from insightad.methods import create_detector
    from insightad.methods.crossfit import scheme_for

    register_meandev()
    det, _, split = train_model(mvtec_dir, NAME, {"image_size": 64}, DataParams(), tmp_path / "m.safetensors",
                                progress=False, decision=DecisionParams(refit_folds="all"))
    rec = det.threshold_info_["decision"]
    assert rec["validation"] == "kfold-refit (k=5)" and rec["n_normal"] == len(split["train"]) == 30
    assert not any("validation set is small" in w for w in rec["warnings"])
    assert scheme_for(create_detector("padim"), "all") == "kfold-exact"
    with pytest.raises(InsightADError, match="refit_folds: expected one of one, all, got 'al'"):
        scheme_for(det, "al")
    paths = sorted((mvtec_dir / "train" / "good").glob("*.png"))[:12]
    ens = create_detector("ensemble", members=["baseline", NAME], image_size=64, refit_folds="all").fit(paths)
    schemes = [m.validation_.scheme for m in ens.members_]
    assert schemes == ["kfold-exact (k=5)", "kfold-refit (k=5)"] and len(ens.decision_scores_) == 12
    with pytest.raises(SystemExit):
        main(["train", "--method", "svdd", "--refit-folds", "every", "--data", str(mvtec_dir)])


def test_refit_folds_all_says_when_it_changes_nothing(mvtec_dir, tmp_path, capsys):
    """baseline is validated exactly on every fold: --refit-folds all asked for it gets one note, not a silent no-op;
    a method that refits (the stub) gets none."""
    register_meandev()
    out = tmp_path / "b.safetensors"
    assert main(["train", "--method", "baseline", "--data", str(mvtec_dir), "--image-size", "64",
                 "--refit-folds", "all", "--out", str(out)]) == 0
    assert "note: --refit-folds all changed nothing for baseline: it is validated on every training normal without " \
           "refitting (kfold-exact (k=5))" in capsys.readouterr().err
    from insightad.apps.train import train_model

    said: list[str] = []
    train_model(mvtec_dir, NAME, {"image_size": 64}, DataParams(), tmp_path / "m.safetensors", progress=False,
                decision=DecisionParams(refit_folds="all"), log=said.append)
    assert not any("--refit-folds" in line for line in said)


def _labels_csv(path, rows, header):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_calibrate_labels_clears_stale_estimates(decided, mvtec_dir, tmp_path, capsys):
    _, src = decided
    model = shutil.copy(src, tmp_path / "m.safetensors")
    goods = sorted((mvtec_dir / "test" / "good").glob("*.png"))
    bads = sorted((mvtec_dir / "test").glob("[!g]*/*.png"))
    csv_path = _labels_csv(tmp_path / "labels.csv", [[str(p), "normal"] for p in goods] +
                           [[str(p), "anomalous"] for p in bads], ["path", "label"])
    assert main(["calibrate", "--model", str(model), "--labels", str(csv_path)]) == 0
    assert "estimates made at training time no longer apply" in capsys.readouterr().out
    thr = read_metadata(model)["threshold"]
    assert thr["strategy"] == "labels_f1" and "decision" not in thr["details"]
    assert thr["details"]["n_normal"] == len(goods) and thr["details"]["n_anomalous"] == len(bads)
    # the same through calibrate --data: the stale decision goes too
    model2 = shutil.copy(src, tmp_path / "m2.safetensors")
    assert main(["calibrate", "--model", str(model2), "--data", str(mvtec_dir)]) == 0
    assert "decision" not in read_metadata(model2)["threshold"]["details"]


def test_calibrate_labels_with_given_scores_checks_the_model_hash(decided, tmp_path, capsys):
    from insightad.decide.labels import file_sha256

    _, src = decided
    model = shutil.copy(src, tmp_path / "m.safetensors")
    sha = file_sha256(model)
    rows = [[f"n{i}", "normal", 0.1 + 0.01 * i, sha] for i in range(10)] + \
           [[f"a{i}", "anomalous", 0.5 + 0.01 * i, sha] for i in range(5)]
    header = ["name", "label", "score", "model_sha256"]
    wrong = _labels_csv(tmp_path / "wrong.csv", [r[:3] + ["0" * 64] for r in rows], header)
    assert main(["calibrate", "--model", str(model), "--labels", str(wrong)]) != 0
    assert "is not the SHA-256" in capsys.readouterr().err
    good = _labels_csv(tmp_path / "good.csv", rows, header)
    assert main(["calibrate", "--model", str(model), "--labels", str(good), "--strategy", "youden", "--json"]) == 0
    thr = read_metadata(model)["threshold"]
    assert 0.19 < thr["value"] < 0.5 and thr["strategy"] == "labels_youden" and thr["details"]["recall"] == 1.0
    bad = _labels_csv(tmp_path / "bad.csv", [["x", "maybe", 1.0, sha]], header)
    assert main(["calibrate", "--model", str(model), "--labels", str(bad)]) != 0
    assert "row 2: label expected normal or anomalous" in capsys.readouterr().err


def test_auto_picks_the_better_of_two_stubs_within_the_budget(mvtec_dir, tmp_path):
    from insightad.apps.auto import auto_fit
    from insightad.data.layouts import discover
    from insightad.model_file import save_model

    register_meandev()
    paths = [s.path for s in discover(mvtec_dir).train][:20]
    kinds = {"noise": NoiseDetector, "meandev": MeanDeviationDetector}

    def factory(m, params):
        return kinds[m](image_size=64)

    chosen, cands = auto_fit(paths, {}, DecisionParams(candidates=["noise", "meandev"]), factory=factory)
    assert chosen.method == "meandev" and chosen.selection_["chosen"] == "meandev"
    rows = {r["method"]: r for r in chosen.selection_["candidates"]}
    assert rows["meandev"]["synthetic_auroc"] > rows["noise"]["synthetic_auroc"]
    assert all(r["fit_seconds"] >= 0 and r["size_mb"] >= 0 for r in rows.values())
    back = load_model(save_model(chosen, tmp_path / "auto.safetensors"))  # the table travels with the model
    assert back.selection_ == chosen.selection_ and back.threshold_info_["decision"]["synthetic_auroc"] > 0.5
    # a budget already spent after the first candidate: the others are skipped and said so
    chosen, cands = auto_fit(paths, {}, DecisionParams(candidates=["noise", "meandev"], time_budget=1e-6),
                             factory=factory)
    assert chosen.method == "noise" and cands[1].detector is None and "time budget" in cands[1].row["skipped"]
    assert np.isfinite(chosen.threshold_)
