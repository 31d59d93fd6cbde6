"""Training images are recognised by content, not only by path: a copy of the training dataset elsewhere is
evaluated on its held-out split as the original is, and a training image copied or renamed into another folder
is refused like one at its recorded path."""

from __future__ import annotations

import shutil

import pytest

from insightad.apps.train import train_model
from insightad.config import DataParams
from insightad.data.layouts import discover, evaluation_samples
from insightad.errors import InsightADError
from insightad.model_file import read_metadata


@pytest.fixture(scope="module")
def crack_model(crack_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("p34") / "m.safetensors"
    train_model(crack_dir, "baseline", {"image_size": 32}, DataParams(), out, progress=False)
    return out


def _names(samples):
    return sorted(s.path.relative_to(s.path.parents[1]) for s in samples)


def test_p34_split_records_each_training_file_content(crack_model):
    split = read_metadata(crack_model)["split"]
    assert len(split["train_sha256"]) == len(split["train"]) and len(split["train_sha256"][0]) == 64


def test_p34_a_copy_of_the_dataset_is_evaluated_on_its_held_out_split(crack_model, crack_dir, tmp_path):
    split = read_metadata(crack_model)["split"]
    copy = tmp_path / "moved"
    shutil.copytree(crack_dir, copy)
    here, there = evaluation_samples(discover(crack_dir), split), evaluation_samples(discover(copy), split)
    assert _names(here) == _names(there)  # not every image of the copy, training images included
    assert not {s.path.name for s in there} & {name.split("/")[-1] for name in split["train"]}


def test_p34_a_renamed_training_image_elsewhere_is_left_out(crack_model, crack_dir, tmp_path):
    split = read_metadata(crack_model)["split"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(crack_dir / split["train"][0], other / "renamed.jpg")
    shutil.copy(crack_dir / split["holdout"][0], other / "new.jpg")
    with pytest.warns(UserWarning, match=r"renamed.jpg: this image was used to train the model \(its content, as"):
        assert [s.path.name for s in evaluation_samples(discover(other), split)] == ["new.jpg"]
    (other / "new.jpg").unlink()
    with pytest.raises(InsightADError, match="no images left to evaluate: all 1 were used to train the model"):
        evaluation_samples(discover(other), split)


def test_p34_a_changed_copy_is_not_taken_for_the_training_dataset(crack_model, crack_dir, tmp_path):
    split = read_metadata(crack_model)["split"]
    copy = tmp_path / "changed"
    shutil.copytree(crack_dir, copy)
    (copy / split["train"][0]).write_bytes((copy / split["holdout"][0]).read_bytes())  # one training file differs
    with pytest.warns(UserWarning, match="was used to train the model"):  # the rest are still training images
        chosen = evaluation_samples(discover(copy), split)
    assert not {s.path.name for s in chosen} & {name.split("/")[-1] for name in split["train"][1:]}
