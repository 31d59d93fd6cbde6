"""A model file checks its own content: a flipped bit in a tensor or an edited metadata field is refused at load
instead of scoring with the damaged values; calibrate's rewrite keeps a valid checksum; older files without one
still load."""

from __future__ import annotations

import shutil

import pytest

from insightad.errors import InsightADError
from insightad.model_file import CHECKSUM_KEY, load_model, read_metadata, update_metadata
from tests.test_hardening_p4 import _rewrite  # the model file written again with its metadata or tensors changed


def test_p33_new_model_files_carry_a_checksum(baseline_model):
    assert len(read_metadata(baseline_model)[CHECKSUM_KEY]) == 64


def test_p33_flipped_tensor_byte_is_refused(tmp_path, baseline_model):
    bad = tmp_path / "flip.safetensors"
    raw = bytearray(baseline_model.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the last tensor: still a valid file, one weight changed
    bad.write_bytes(bytes(raw))
    with pytest.raises(InsightADError, match="does not match its checksum"):
        load_model(bad)


def test_p33_edited_threshold_is_refused(tmp_path, baseline_model):
    bad = tmp_path / "edited.safetensors"
    _rewrite(baseline_model, bad, change_meta=lambda m: m["threshold"].update(value=m["threshold"]["value"] * 2))
    with pytest.raises(InsightADError, match=f"{bad}: the model file's content does not match"):
        load_model(bad)
    with pytest.raises(InsightADError, match="does not match its checksum"):  # not re-stamped as if it were fine
        update_metadata(bad, selection=None)


def test_p33_update_metadata_keeps_a_valid_checksum(tmp_path, baseline_model):
    path = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, path)
    before = read_metadata(path)[CHECKSUM_KEY]
    update_metadata(path, threshold={**read_metadata(path)["threshold"], "value": 1.5})
    assert read_metadata(path)[CHECKSUM_KEY] != before
    assert load_model(path).threshold_ == 1.5


def test_p33_file_without_checksum_still_loads(tmp_path, baseline_model):
    old = tmp_path / "old.safetensors"
    _rewrite(baseline_model, old, change_meta=lambda m: m.pop(CHECKSUM_KEY))
    assert load_model(old).threshold_ == read_metadata(baseline_model)["threshold"]["value"]
