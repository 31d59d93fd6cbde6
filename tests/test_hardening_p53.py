"""Hardening p53: ``--resume`` on training images replaced under the same names.

A checkpoint recorded which images it trained on by their names and order only: a folder whose images were
replaced (a camera's new captures under the same file names, images edited or cleaned) resumed the old run and
finished it on other pixels, with nothing said. The checkpoint records the images' content too now; one line says
why it is refused. A checkpoint written before that is checked by names, as it was.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from insightad.config import DataParams
from insightad.errors import InsightADError


def test_p53_content_digest_follows_the_bytes_not_the_names(tmp_path):
    from insightad.training.data import content_digest, data_fingerprint, sources_digest

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(a)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(b)
    before = data_fingerprint([a, b])
    assert before == {"data": sources_digest([a, b]), "data_content": content_digest([a, b])}
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(b)  # replaced under the same name
    after = data_fingerprint([a, b])
    assert after["data"] == before["data"] and after["data_content"] != before["data_content"]
    assert content_digest([b, a]) != content_digest([a, b])  # order counts, as for the names
    arr = np.zeros((8, 8, 3), np.uint8)
    assert content_digest([arr]) == content_digest([arr.copy()]) != content_digest([arr + 1])
    assert content_digest([tmp_path / "missing.png"]) == content_digest([tmp_path / "gone.png"])  # no traceback


def _train(data, out, **extra):
    from insightad.apps.train import train_model

    params = {"weights": "random", "image_size": 32, "batch_size": 8, "val_fraction": 0.0, **extra}
    return train_model(data, "svdd", params, DataParams(), out, progress=False)[0]


def test_p53_resume_on_replaced_images_is_refused(mvtec_dir, tmp_path):
    data = tmp_path / "disc"
    shutil.copytree(mvtec_dir, data)
    out = tmp_path / "m.safetensors"
    _train(data, out, epochs=1)
    victim = sorted((data / "train" / "good").glob("*.png"))[3]
    img = np.asarray(Image.open(victim)).copy()
    img[:8, :8] = 255 - img[:8, :8]  # another capture under the same name
    Image.fromarray(img).save(victim)
    with pytest.raises(InsightADError, match="content has changed since") as e:
        _train(data, out, epochs=2, resume=True)
    assert "without --resume" in str(e.value)


def test_p53_a_checkpoint_without_the_content_resumes_as_before(mvtec_dir, tmp_path):
    """Written before the content was recorded: checked by names and order, and resumed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from insightad.training.checkpoint import FILE_NAME, META_KEY

    out = tmp_path / "m.safetensors"
    _train(mvtec_dir, out, epochs=1)
    ckpt = out.with_suffix(".training") / FILE_NAME
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    del meta["fingerprint"]["data_content"]
    save_file(load_file(str(ckpt)), str(ckpt), metadata={META_KEY: json.dumps(meta)})
    det = _train(mvtec_dir, out, epochs=2, resume=True)
    assert det.training_.resumed_from == 1 and det.training_.epochs_run == 2
