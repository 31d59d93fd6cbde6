"""insightad calibrate: strategies through the CLI, what is stored in the model file, refusals, overrides."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from insightad.model_file import load_model, read_metadata
from tests.mapdetector import map_model  # noqa: F401  (fixture)


@pytest.fixture
def model(baseline_model, tmp_path):
    """A private copy of the session's baseline model (calibrate rewrites it)."""
    return shutil.copy(baseline_model, tmp_path / "model.safetensors")


def test_percentile_stores_threshold_and_says_which_images(model, mvtec_dir, tmp_path, capsys):
    before = read_metadata(model)["threshold"]
    out = tmp_path / "thr.json"
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "calibrated on 8 normal and 0 defective images" in cap.out and "8 in test/good" in cap.out
    assert "only 8 normal images for the 95th percentile" in cap.err  # too few for p95
    assert "optimistic" in cap.err  # same images as evaluate
    thr = read_metadata(model)["threshold"]
    assert thr["strategy"] == "percentile" and thr["value"] != before["value"]
    d = thr["details"]
    assert d["percentile"] == 95 and d["n_normal"] == 8 and len(d["images"]) == 8
    assert all(p.startswith("test/good/") for p in d["images"])
    assert d["previous"] == {"value": before["value"], "strategy": before["strategy"]}
    assert d["scale"] > 0 and d["warnings"]
    det = load_model(model)
    normals = det.predict([mvtec_dir / p for p in d["images"]], maps=False).scores
    assert thr["value"] == pytest.approx(np.percentile(normals, 95), rel=1e-4)  # engines agree within 1e-4
    saved = json.loads(out.read_text())
    assert saved["threshold"] == thr["value"] and saved["strategy"] == "percentile"


@pytest.mark.parametrize("strategy,key", [("f1", "f1"), ("youden", "youden_j")])
def test_labelled_strategies(model, mvtec_dir, capsys, strategy, key):
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--strategy", strategy, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    thr = read_metadata(model)["threshold"]
    assert printed["value"] == thr["value"] and thr["strategy"] == strategy
    assert thr["details"]["n_anomalous"] == 16 and 0 < thr["details"][key] <= 1


def test_extra_normal_folder_and_threshold_override(model, mvtec_dir, tmp_path, capsys):
    from insightad.data.synthetic import make_image

    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(12):
        make_image("disc", None, seed=500 + i, size=96)[0].save(extra / f"n{i:02d}.png")
    assert main(["calibrate", "--model", str(model), "--data", str(extra), "--percentile", "90",
                 "--out", str(tmp_path / "t.json")]) == 0
    cap = capsys.readouterr()
    assert "12 normal" in cap.out and "warning" not in cap.err  # enough for p90, not the evaluation images
    thr = read_metadata(model)["threshold"]
    assert thr["details"]["layout"] == "images"
    # predict: --threshold FILE.json and VALUE both override the model's value
    img = str(mvtec_dir / "test" / "good" / "000.png")
    main(["predict", "--model", str(model), img, "--json", "--threshold", str(tmp_path / "t.json")])
    row = json.loads(capsys.readouterr().out)
    assert row["threshold"] == thr["value"] and (row["score_normalized"] > 0.5) == row["anomalous"]
    main(["predict", "--model", str(model), img, "--json", "--threshold", "1e9"])
    row = json.loads(capsys.readouterr().out)
    assert row["threshold"] == 1e9 and row["anomalous"] is False


def test_dry_run_changes_nothing(model, mvtec_dir, capsys):
    before = model.read_bytes()
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--strategy", "youden",
                 "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and model.read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--strategy", "f1", "--data", "{extra}"], "strategy f1 needs defective images and found none"),
    (["--data", "{train}"], "all 30 were used to train the model"),
    (["--percentile", "120"], "--percentile: expected a value between 0 and 100"),
    (["--out", "{tmp}/thr.pkl"], "--out: expected a .json file name"),
    (["--strategy", "roc"], "invalid choice: 'roc'"),
])
def test_refusals(model, mvtec_dir, tmp_path, capsys, args, message):
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (96, 96), (90, 90, 90)).save(extra / "a.png")
    args = [a.format(extra=extra, train=mvtec_dir / "train" / "good", tmp=tmp_path) for a in args]
    if "--data" not in args:
        args += ["--data", str(mvtec_dir)]
    before = model.read_bytes()
    try:
        code = main(["calibrate", "--model", str(model), *args])
    except SystemExit as e:  # argparse choices
        code = e.code
    assert code != 0
    assert message in capsys.readouterr().err
    assert model.read_bytes() == before


def test_pickle_threshold_refused(model, mvtec_dir, tmp_path, capsys):
    pkl = tmp_path / "thr_padim.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    code = main(["predict", "--model", str(model), str(mvtec_dir / "test" / "good" / "000.png"),
                 "--threshold", str(pkl)])
    assert code == 1 and "pickle threshold files are refused" in capsys.readouterr().err


def test_map_method_gets_pixel_threshold(map_model, mvtec_dir):
    assert main(["calibrate", "--model", str(map_model), "--data", str(mvtec_dir), "--strategy", "youden"]) == 0
    d = read_metadata(map_model)["threshold"]["details"]
    assert d["pixel_threshold"] > 0 and d["pixel_scale"] > 0
