"""Issue 14: train writes the verified ONNX graph beside the model file; the onnx engine uses it only when
it is stamped with the model file's sha256 (a stale, swapped or truncated graph is never used)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from insightad.cli import main
from insightad.engines.onnx_runtime import CACHE_KEY, read_onnx_metadata
from insightad.io import file_sha256

pytest.importorskip("onnxruntime")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@pytest.fixture(scope="module")
def trained(mvtec_dir, tmp_path_factory):
    """A model trained by the CLI (which writes model.onnx beside model.safetensors)."""
    out = tmp_path_factory.mktemp("beside") / "model.safetensors"
    assert main(["train", "--data", str(mvtec_dir), "--method", "baseline", "--image-size", "64",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def _images(mvtec_dir):
    return sorted((mvtec_dir / "test").rglob("*.png"))[:4]


def test_train_writes_a_stamped_graph_that_predict_uses(trained, mvtec_dir, cache):
    from insightad.inference.load import load_for_inference

    graph = trained.with_suffix(".onnx")
    meta = read_onnx_metadata(graph)
    assert meta[CACHE_KEY] == file_sha256(trained) and meta["method"] == "baseline"
    assert meta["decode"]["exif_orientation"].startswith("not applied") and meta["score_scale"] > 0
    det = load_for_inference(trained, "onnx")
    assert det.engine_name_ == "onnx" and not list(cache.glob("*.onnx"))  # the graph beside was used: nothing exported
    ref = load_for_inference(trained, "torch").predict(_images(mvtec_dir))
    got = det.predict(_images(mvtec_dir))
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4)
    np.testing.assert_allclose(got.scores_normalized, ref.scores_normalized, atol=1e-4)


@pytest.mark.parametrize("damage", ["truncated", "other model", "stale"])
def test_a_bad_graph_beside_is_never_used(trained, mvtec_dir, cache, tmp_path, damage):
    from insightad.inference.load import load_for_inference

    model = tmp_path / "model.safetensors"
    shutil.copyfile(trained, model)
    graph = model.with_suffix(".onnx")
    data = trained.with_suffix(".onnx").read_bytes()
    if damage == "truncated":
        graph.write_bytes(data[: len(data) // 2])
    elif damage == "other model":  # a graph stamped for another model file
        from insightad.inference.export import export_onnx
        from insightad.model_file import load_model

        export_onnx(load_model(trained), graph, "0" * 64)
    else:  # the model file changed after the graph was written (here: its threshold moved)
        from insightad.model_file import load_model, save_model

        graph.write_bytes(data)
        det = load_model(model)
        save_model(det.set_threshold(det.threshold_ * 1.5, "manual"), model)
    with pytest.warns(UserWarning, match="not the graph of"):
        det = load_for_inference(model, "onnx")
    assert det.engine_name_ == "onnx" and len(list(cache.glob("*.onnx"))) == 1  # rebuilt into the cache
    ref = load_for_inference(model, "torch").predict(_images(mvtec_dir)).scores
    np.testing.assert_allclose(det.predict(_images(mvtec_dir)).scores, ref, rtol=1e-4)


def test_no_onnx_skips_the_graph(mvtec_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--data", str(mvtec_dir), "--method", "baseline", "--image-size", "32",
                 "--out", str(out), "--no-progress", "--no-onnx"]) == 0
    assert out.exists() and not out.with_suffix(".onnx").exists()
    assert "ONNX graph written" not in capsys.readouterr().out


def test_ready_copy_is_made_once_reused_and_scores_the_same(trained, mvtec_dir, cache, tmp_path):
    """A graph opens through its session-ready copy (optimised, constants in a mapped file), made once."""
    from insightad.engines.cache import READY, READY_DATA, ready_copy
    from insightad.engines.onnx_runtime import OnnxEngine

    graph = tmp_path / "model.onnx"
    shutil.copyfile(trained.with_suffix(".onnx"), graph)
    first = ready_copy(graph)
    assert first is not None and first.is_file() and (first.parent / READY_DATA).stat().st_size > 0
    assert ready_copy(graph) == first and len(list((cache / READY).iterdir())) == 1
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 70, 90), dtype=np.uint8)
    got = OnnxEngine(str(graph))(x)
    ref = OnnxEngine(str(graph), ready=False)(x)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_rewritten_graph_gets_a_new_ready_copy(trained, cache, tmp_path):
    """The ready copy is keyed by the file's identity: a graph replaced by another never opens the old copy."""
    from insightad.engines.cache import ready_copy

    graph = tmp_path / "model.onnx"
    shutil.copyfile(trained.with_suffix(".onnx"), graph)
    first = ready_copy(graph)
    replacement = tmp_path / "new.onnx"
    shutil.copyfile(trained.with_suffix(".onnx"), replacement)
    replacement.replace(graph)  # same bytes, another file (how atomic writers replace a graph)
    second = ready_copy(graph)
    assert second is not None and second != first


def test_no_ready_copy_where_the_cache_cannot_be_written(trained, tmp_path, monkeypatch):
    """An unwritable cache is no reason to fail: the graph opens the slow way."""
    from insightad.engines.cache import ready_copy
    from insightad.engines.onnx_runtime import OnnxEngine

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("INSIGHTAD_CACHE", str(blocker))
    graph = trained.with_suffix(".onnx")
    assert ready_copy(graph) is None
    x = np.zeros((1, 3, 64, 64), dtype=np.uint8)
    assert np.isfinite(OnnxEngine(str(graph))(x)[0]).all()


def test_prune_counts_ready_copies(trained, cache, tmp_path):
    from insightad.engines.cache import READY, prune_cache, ready_copy

    graph = tmp_path / "model.onnx"
    shutil.copyfile(trained.with_suffix(".onnx"), graph)
    assert ready_copy(graph) is not None
    prune_cache(limit=0)
    assert not list((cache / READY).iterdir())


def test_model_digest_is_remembered_per_file_version(trained, cache, tmp_path):
    """A model file is hashed once per version; a rewritten file (new bytes, new timestamp) is hashed again."""
    import os

    from insightad.engines.cache import DIGESTS, model_digest
    from insightad.io import file_sha256

    model = tmp_path / "model.safetensors"
    shutil.copyfile(trained, model)
    old = os.stat(model).st_mtime - 60
    os.utime(model, (old, old))  # not racy: old enough to trust its timestamp
    assert model_digest(model) == file_sha256(model) and len(list((cache / DIGESTS).iterdir())) == 1
    assert model_digest(model) == file_sha256(model)
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))  # same size, in place: only the timestamp tells
    assert model_digest(model) == file_sha256(model)  # just written: racy, hashed again


def test_large_stacks_run_in_equal_slices_with_the_same_results(trained, monkeypatch):
    """Runs are sliced to bound ONNX Runtime's buffers; the answers do not depend on the slicing."""
    from insightad.engines import onnx_runtime
    from insightad.engines.onnx_runtime import OnnxEngine

    engine = OnnxEngine(str(trained.with_suffix(".onnx")))
    x = np.random.default_rng(1).integers(0, 256, (5, 3, 80, 70), dtype=np.uint8)
    whole = engine(x)
    calls = []
    run = engine.session.run
    monkeypatch.setattr(engine.session, "run", lambda out, feed: calls.append(len(feed["images"])) or run(out, feed))
    monkeypatch.setattr(onnx_runtime, "RUN_VALUES", 2 * 3 * 80 * 70)
    sliced = engine(x)
    assert calls == [2, 2, 1]
    for a, b in zip(whole, sliced):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_stamp_is_read_without_loading_the_graph(trained, tmp_path, monkeypatch):
    """Checking whose graph a file is (train and export before writing one, threshold files) reads its metadata
    only: ONNX Runtime loading PaDiM's graph for that held 400 MB more, on every train into an existing path."""
    import onnxruntime

    from insightad.engines.onnx_runtime import metadata_props, read_stamp

    graph = trained.with_suffix(".onnx")
    props = metadata_props(graph)
    assert props[CACHE_KEY] == read_onnx_metadata(graph)[CACHE_KEY] and props["method"] == "baseline"

    def no_session(*args, **kwargs):
        raise AssertionError("the stamp must be read without loading the graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    assert read_stamp(graph) == file_sha256(trained)
    data = graph.read_bytes()
    for name, content in [("truncated", data[: len(data) // 2]), ("garbage", b"\xff" * 64), ("empty", b""),
                          ("flipped", data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])]:
        bad = tmp_path / f"{name}.onnx"
        bad.write_bytes(content)
        assert read_stamp(bad) is None, name
    assert read_stamp(tmp_path / "missing.onnx") is None


def test_a_foreign_onnx_file_has_no_stamp(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from insightad.engines.onnx_runtime import metadata_props, read_stamp

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    helper.set_model_props(model, {CACHE_KEY: "ab" * 32, "other": "é"})
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    assert metadata_props(path) == {CACHE_KEY: "ab" * 32, "other": "é"}
    assert read_stamp(path) is None  # a stamp without InsightAD's own metadata is not one of ours


def test_info_checks_the_graph_input_without_loading_the_graph(trained, tmp_path, monkeypatch):
    """``info`` on a graph (read_onnx_metadata) walks the file's fields for its metadata and inputs: loading PaDiM's
    graph in ONNX Runtime for that took ~500 MB. What it reads equals what a session reports."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime
    from onnx import TensorProto, helper

    from insightad.engines.onnx_runtime import check_metadata, check_props, graph_inputs, make_session, metadata_props
    from insightad.errors import InsightADError

    graph = trained.with_suffix(".onnx")
    session = make_session(str(graph))
    assert graph_inputs(graph) == {i.name: (i.type, list(i.shape)) for i in session.get_inputs()}
    with_session = check_metadata(session, graph)
    # a foreign graph: several inputs, other element types, fixed and symbolic dims
    node = helper.make_node("Concat", ["a", "b"], ["y"], axis=0)
    foreign = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
                      helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    other = make_session(str(tmp_path / "foreign.onnx"))
    assert graph_inputs(tmp_path / "foreign.onnx") == {i.name: (i.type, list(i.shape)) for i in other.get_inputs()}

    def no_session(*args, **kwargs):
        raise AssertionError("info must not load the graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    assert read_onnx_metadata(graph) == with_session
    # a graph whose input is float under the same metadata: refused in one line naming what was expected (an
    # exported file edited so is refused by its checksum first)
    with pytest.raises(InsightADError, match="graph input is not uint8"):
        check_props(metadata_props(graph), {"images": ("tensor(float)", ["batch", 3, "height", "width"])}, graph)
    model = onnx.load(str(graph))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.save(model, str(tmp_path / "float.onnx"))
    with pytest.raises(InsightADError, match="checksum"):
        read_onnx_metadata(tmp_path / "float.onnx")
    (tmp_path / "cut.onnx").write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(InsightADError, match="cut.onnx"):
        read_onnx_metadata(tmp_path / "cut.onnx")
