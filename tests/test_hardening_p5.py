"""Issue 12 point 5: ONNX cache entries are keyed and checked by the model file's sha256; bad entries never used."""

from __future__ import annotations

import json
import shutil

import pytest

from insightad.engines import onnx_runtime
from insightad.errors import InsightADError
from insightad.inference.export import cached_engine
from insightad.inference.load import load_for_inference
from insightad.io import file_sha256
from insightad.model_file import META_KEY


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def _image(mvtec_dir):
    return min((mvtec_dir / "test" / "good").iterdir())


def _score(model, image):
    det = load_for_inference(model, "onnx")
    assert det.engine_name_ == "onnx"
    return float(det.predict([image], maps=False).scores[0])


def _entry(cache, model):
    return cache / f"{file_sha256(model)}.onnx"


def test_p5_truncated_entry_is_rebuilt(baseline_model, mvtec_dir, cache):
    image = _image(mvtec_dir)
    first = _score(baseline_model, image)
    entry = _entry(cache, baseline_model)
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 3])
    assert _score(baseline_model, image) == pytest.approx(first, rel=1e-6)
    assert entry.stat().st_size == len(data)  # rebuilt whole


def test_p5_swapped_entry_is_not_used(baseline_model, mvtec_dir, cache, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    with safe_open(str(baseline_model), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    meta.pop("content_sha256")  # a model of its own, not an edited copy of this one
    tensors = load_file(str(baseline_model))
    # another model: different scores for the same image (whichever tensors its scorer reads)
    tensors = {k: v * 3.0 if v.is_floating_point() and not k.startswith("extractor.") else v for k, v in tensors.items()}
    save_file(tensors, str(other), metadata={META_KEY: json.dumps(meta)})

    image = _image(mvtec_dir)
    mine, theirs = _score(baseline_model, image), _score(other, image)
    assert abs(mine - theirs) > 1e-3 * abs(mine)
    shutil.copyfile(_entry(cache, other), _entry(cache, baseline_model))  # swap the cache entry
    assert _score(baseline_model, image) == pytest.approx(mine, rel=1e-6)


def test_p5_bad_entry_refused_without_pytorch_model(baseline_model, mvtec_dir, cache):
    det = load_for_inference(baseline_model, "onnx")
    entry = _entry(cache, baseline_model)
    entry.write_bytes(b"not an onnx graph")
    det.model_ = None  # what a runtime without PyTorch has: nothing to rebuild the graph from
    with pytest.raises(InsightADError, match="PyTorch is not available") as e:
        cached_engine(det, baseline_model)
    assert str(baseline_model) in str(e.value) and not entry.exists()  # never used, not kept


def test_p5_entry_carries_the_model_hash(baseline_model, cache):
    load_for_inference(baseline_model, "onnx")
    import onnx

    proto = onnx.load(str(_entry(cache, baseline_model)))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[onnx_runtime.CACHE_KEY] == file_sha256(baseline_model)
