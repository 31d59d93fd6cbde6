"""Issue 12 point 31: calibrate's threshold files name their model; --labels refuses training images and
contradictory rows; writes through a link replace its target; calibrate refreshes the graph beside the
model; warnings reach the user as one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from insightad.cli import main
from insightad.io import atomic_write_bytes, file_sha256
from insightad.model_file import read_metadata, update_metadata


@pytest.fixture
def model(baseline_model, tmp_path):
    """A private copy of the session's baseline model (calibrate rewrites it)."""
    return shutil.copy(baseline_model, tmp_path / "model.safetensors")


@pytest.fixture
def other_model(baseline_model, tmp_path):
    """Another model file: the same tensors, another threshold, so another sha256."""
    other = shutil.copy(baseline_model, tmp_path / "other.safetensors")
    update_metadata(other, threshold={"value": 123.0, "strategy": "manual", "details": {}})
    return other


def _image(mvtec_dir):
    return str(sorted((mvtec_dir / "test" / "good").iterdir())[0])


@pytest.mark.parametrize("dry_run", [False, True])
def test_p31_threshold_file_carries_the_sha256_of_the_model_as_left(model, mvtec_dir, tmp_path, capsys, dry_run):
    before = file_sha256(model)
    out = tmp_path / "thr.json"
    argv = ["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--out", str(out)]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 0
    saved = json.loads(out.read_text())
    assert saved["model_sha256"] == file_sha256(model)  # the rewritten file, or the untouched one
    assert (file_sha256(model) == before) == dry_run


def test_p31_threshold_file_of_another_model_is_refused_by_predict(model, other_model, mvtec_dir, tmp_path, capsys):
    out = tmp_path / "thr.json"
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--threshold", str(out), _image(mvtec_dir)]) == 0
    capsys.readouterr()
    rc = main(["predict", "--model", str(other_model), "--threshold", str(out), _image(mvtec_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "thr.json: this threshold was chosen for another model" in err
    assert "model.safetensors" in err and "other.safetensors" in err  # both named


def test_p31_batch_refuses_a_threshold_file_of_another_model(model, other_model, mvtec_dir, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"threshold": 1.0, "model_sha256": file_sha256(model), "model": str(model)}))
    rc = main(["batch", "--model", str(other_model), "--input", str(mvtec_dir / "test" / "good"),
               "--out", str(tmp_path / "r.parquet"), "--threshold", str(thr), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "thr.json: this threshold was chosen for another model" in err
    assert not (tmp_path / "r.parquet").exists()


def _labels(tmp_path, rows):
    path = tmp_path / "labels" / "train.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


def test_p31_labels_listing_a_training_image_is_refused(model, mvtec_dir, tmp_path, capsys):
    split = read_metadata(model)["split"]
    trained = mvtec_dir / split["train"][0]
    rows = [(os.path.relpath(trained, tmp_path / "labels"), "normal"),
            (mvtec_dir / "test" / "good" / "000.png", "normal"),
            (sorted((mvtec_dir / "test").glob("[!g]*/*.png"))[0], "anomalous")]
    rc = main(["calibrate", "--model", str(model), "--labels", str(_labels(tmp_path, rows)), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 1 and "was used to train the model" in err and trained.name in err


def test_p31_labels_with_contradictory_rows_are_refused(model, mvtec_dir, tmp_path, capsys):
    good = sorted((mvtec_dir / "test" / "good").iterdir())
    bad = sorted((mvtec_dir / "test").glob("[!g]*/*.png"))
    rows = [(good[0], "normal"), (good[1], "normal"), (bad[0], "anomalous"), (good[0], "anomalous")]
    labels = _labels(tmp_path, rows)
    rc = main(["calibrate", "--model", str(model), "--labels", str(labels), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 1 and "train.csv" in err and good[0].name in err and "different labels (rows 2 and 5)" in err


def test_p31_labels_exact_repeat_counts_once(model, mvtec_dir, tmp_path, capsys):
    good = sorted((mvtec_dir / "test" / "good").iterdir())
    bad = sorted((mvtec_dir / "test").glob("[!g]*/*.png"))
    rows = [(good[0], "normal"), (good[1], "normal"), (bad[0], "anomalous"), (good[0], "normal")]
    assert main(["calibrate", "--model", str(model), "--labels", str(_labels(tmp_path, rows)), "--dry-run",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["details"]
    assert d["n_normal"] == 2 and d["n_anomalous"] == 1


def test_p31_atomic_write_replaces_a_links_target(tmp_path):
    target = tmp_path / "v1.bin"
    target.write_bytes(b"old")
    link = tmp_path / "cur.bin"
    link.symlink_to(target.name)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_p31_calibrate_through_a_link_rewrites_the_linked_model(model, mvtec_dir, tmp_path, capsys):
    v1 = model.rename(tmp_path / "v1.safetensors")
    cur = tmp_path / "cur.safetensors"
    cur.symlink_to(v1.name)
    before = read_metadata(v1)["threshold"]["value"]
    assert main(["calibrate", "--model", str(cur), "--data", str(mvtec_dir)]) == 0
    assert cur.is_symlink() and os.readlink(cur) == v1.name
    assert read_metadata(v1)["threshold"]["value"] != before


def test_p31_calibrate_refreshes_the_graph_beside_the_model(model, mvtec_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    from insightad.apps.train import write_graph_beside
    from insightad.engines.onnx_runtime import CACHE_KEY, read_onnx_metadata
    from insightad.model_file import load_model

    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path / "cache"))
    graph, _ = write_graph_beside(load_model(model), model)  # what train leaves beside the model
    assert graph is not None
    out = tmp_path / "thr.json"
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--out", str(out)]) == 0
    assert f"ONNX graph {graph} refreshed" in capsys.readouterr().out
    meta = read_onnx_metadata(graph)
    assert meta[CACHE_KEY] == file_sha256(model)
    assert meta["threshold"] == pytest.approx(read_metadata(model)["threshold"]["value"])
    assert main(["predict", "--model", str(model), "--engine", "onnx", _image(mvtec_dir)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["predict", "--model", str(graph), "--threshold", str(out), _image(mvtec_dir)]) == 0  # its export


def test_p31_a_warning_reaches_the_user_as_one_line(model, mvtec_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    from insightad.apps.train import write_graph_beside
    from insightad.model_file import load_model

    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path / "cache"))
    write_graph_beside(load_model(model), model)
    update_metadata(model, threshold={"value": 5.0, "strategy": "manual", "details": {}})  # the graph is stale
    assert main(["predict", "--model", str(model), _image(mvtec_dir)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "not the graph of" in line]
    assert len(lines) == 1 and lines[0].startswith("insightad: warning: ")
    assert "UserWarning" not in err and ".py:" not in err
