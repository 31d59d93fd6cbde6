"""Issue 12 point 21: a folder holding only Negative/ (or only normal/) is a dataset: train and calibrate on it."""

from __future__ import annotations

import shutil

import pytest

from insightad.cli import main
from insightad.data.layouts import detect_layout, discover
from tests.conftest import SIZE


def _only(src_dir, tmp_path, name):
    root = tmp_path / f"only-{name}"
    (root / name).mkdir(parents=True)
    for p in sorted(src_dir.iterdir())[:8]:
        shutil.copyfile(p, root / name / p.name)
    return root


@pytest.mark.parametrize("name,layout", [("Negative", "crack"), ("normal", "folder"), ("Normal", "folder")])
def test_p21_single_normal_folder_is_recognised(mvtec_dir, tmp_path, name, layout):
    root = _only(mvtec_dir / "train" / "good", tmp_path, name)
    assert detect_layout(root) == layout
    ds = discover(root)
    assert ds.layout == layout and ds.counts() == {"normal": 8, "anomalous": 0}


def test_p21_train_on_negative_only(mvtec_dir, tmp_path, capsys):
    root = _only(mvtec_dir / "train" / "good", tmp_path, "Negative")
    model = tmp_path / "m.safetensors"
    code = main(["train", "--data", str(root), "--out", str(model), "--image-size", str(SIZE), "--holdout", "0.25"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "crack layout" in out and model.exists()


def test_p21_calibrate_on_negative_only(baseline_model, mvtec_dir, tmp_path, capsys):
    root = _only(mvtec_dir / "test" / "good", tmp_path, "Negative")
    code = main(["calibrate", "--model", str(baseline_model), "--data", str(root), "--dry-run", "--engine", "torch"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "calibrated on 8 normal and 0 defective images" in out
