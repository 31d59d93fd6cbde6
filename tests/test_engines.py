"""Engines: ONNX export verified against PyTorch, same scores across engines, foreign files refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from insightad.cli import main
from insightad.errors import InsightADError
from insightad.inference.load import load_for_inference

onnx = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def images(mvtec_dir):
    return sorted((mvtec_dir / "test").rglob("*.png"))[:10]


def test_engines_agree_within_1e4(baseline_model, images):
    torch_scores = load_for_inference(baseline_model, "torch").predict(images).scores
    onnx_det = load_for_inference(baseline_model, "onnx")
    assert onnx_det.engine_name_ == "onnx"
    onnx_scores = onnx_det.predict(images).scores
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4)
    # The same image always gets the same score on one engine, alone or in a batch.
    alone = onnx_det.predict(images[3:4]).scores[0]
    assert alone == pytest.approx(onnx_scores[3], rel=1e-6)


def test_auto_engine_is_onnx_on_cpu(baseline_model):
    assert load_for_inference(baseline_model).engine_name_ == "onnx"


def test_export_cli_and_predict_from_onnx_file(baseline_model, images, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(baseline_model), "--format", "onnx", "--out", str(out)]) == 0
    assert "verified against PyTorch" in capsys.readouterr().out
    import onnx as onnx_lib

    props = {p.key: p.value for p in onnx_lib.load(str(out)).metadata_props}
    meta = json.loads(props["insightad"])
    assert meta["input_height"] == 64 and meta["resize"] == "bilinear" and float(props["threshold"]) > 0
    det = load_for_inference(out)
    ref = load_for_inference(baseline_model, "torch").predict(images).scores
    np.testing.assert_allclose(det.predict(images).scores, ref, rtol=1e-4)
    assert main(["predict", "--model", str(out), str(images[0]), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["score"] == pytest.approx(ref[0], rel=1e-4)


def test_foreign_and_mismatched_onnx_refused(tmp_path, baseline_model):
    import onnx as onnx_lib
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["images"], ["scores"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.UINT8, [1, 3, 8, 8])])
    foreign = tmp_path / "foreign.onnx"
    onnx_lib.save(helper.make_model(graph), str(foreign))
    with pytest.raises(InsightADError, match="not an InsightAD ONNX export"):
        load_for_inference(foreign)
    # Right metadata, wrong graph: the metadata says 64x64 but the graph takes 8x8.
    out = tmp_path / "m.onnx"
    main(["export", "--model", str(baseline_model), "--out", str(out)])
    meta = {p.key: p.value for p in onnx_lib.load(str(out)).metadata_props}
    model = helper.make_model(graph)
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    mismatched = tmp_path / "mismatch.onnx"
    onnx_lib.save(model, str(mismatched))
    with pytest.raises(InsightADError, match="does not match"):
        load_for_inference(mismatched)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    with pytest.raises(InsightADError, match="not a readable ONNX file"):
        load_for_inference(junk)
    with pytest.raises(InsightADError, match="onnx engine only"):
        load_for_inference(out, "torch")


def test_unexportable_model_says_why(baseline_model, tmp_path):
    from insightad.inference.export import export_onnx
    from insightad.model_file import load_model

    det = load_model(baseline_model)
    det.onnx_unsupported = "a part of this model has no ONNX equivalent"  # capability flag now on the detector
    with pytest.raises(InsightADError, match="cannot export to ONNX: a part"):
        export_onnx(det, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_evaluate_same_on_both_engines(baseline_model, mvtec_dir, capsys):
    results = {}
    for engine in ("torch", "onnx"):
        assert main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--json",
                     "--engine", engine]) == 0
        results[engine] = json.loads(capsys.readouterr().out)
    assert results["torch"]["image_auroc"] == pytest.approx(results["onnx"]["image_auroc"], abs=1e-9)


def test_feature_runner_cache_tells_levels_apart():
    """Same weights, other levels: a different graph (the cache key includes the levels)."""
    import torch

    from insightad.backbones import build_extractor
    from insightad.backbones.normalize import Normalize
    from insightad.engines.features import feature_runner

    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for layers, channels in (([1, 2, 3], [24, 40, 112]), ([2, 3], [40, 112])):
        ext, _, _ = build_extractor("tf_efficientnet_lite0", layers)
        run, engine = feature_runner(norm, ext, (3, 32, 32), "onnx")
        assert engine == "onnx" and [f.shape[1] for f in run(x)] == channels


def test_feature_runner_chunks_a_batch_into_place():
    """A batch larger than one ONNX Runtime call runs in chunks copied into one output per level: the same
    features as the batch's images one at a time."""
    import torch

    from insightad.backbones import build_extractor
    from insightad.backbones.normalize import Normalize
    from insightad.engines.features import ONNX_CHUNK, feature_runner

    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    ext, _, _ = build_extractor("tf_efficientnet_lite0", [1, 2])
    run, engine = feature_runner(norm, ext, (3, 32, 32), "onnx")
    x = torch.rand(2 * ONNX_CHUNK + 3, 3, 32, 32) * 255
    got = run(x)
    assert engine == "onnx" and [f.shape[0] for f in got] == [len(x)] * 2
    for i in (0, ONNX_CHUNK, len(x) - 1):
        for level, alone in zip(got, run(x[i:i + 1])):
            torch.testing.assert_close(level[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_reused_backbone_graph_counts_as_used(monkeypatch, tmp_path):
    """The fit's backbone graph is marked used each time it is opened, so pruning the cache (least recently used
    first) takes the large model graphs written since before the graph every fit needs."""
    import os

    import torch

    from insightad.backbones import build_extractor
    from insightad.backbones.normalize import Normalize
    from insightad.engines.cache import cache_dir
    from insightad.engines.features import feature_runner

    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path))
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    ext, _, _ = build_extractor("tf_efficientnet_lite0", [1, 2])
    feature_runner(norm, ext, (3, 32, 32), "onnx")
    (graph,) = cache_dir().glob("features-*.onnx")
    os.utime(graph, (1_000_000, 1_000_000))
    run, engine = feature_runner(norm, ext, (3, 32, 32), "onnx")
    assert engine == "onnx" and len(run(torch.zeros(1, 3, 32, 32))) == 2
    assert graph.stat().st_mtime > 1_000_000


@pytest.mark.parametrize("method,params", [
    ("padim", {}), ("padim", {"score_top": 0.0, "shrinkage": 0.0}), ("padim", {"score_top": 0.07}),
    ("patchcore", {"coreset_ratio": 0.2}), ("svdd", {"epochs": 3, "device": "cpu"}),
])
def test_every_exportable_method_agrees_across_engines(method, params, mvtec_dir, tmp_path):
    from insightad.apps.train import train_model
    from insightad.config import DataParams

    out = tmp_path / f"{method}.safetensors"
    train_model(mvtec_dir, method, {"image_size": 64, **params}, DataParams(), out, progress=False)
    images = sorted((mvtec_dir / "test").rglob("*.png"))[::3]
    ref = load_for_inference(out, "torch").predict(images)
    got = load_for_inference(out, "onnx").predict(images)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4)
    if ref.maps is not None:
        for a, b in zip(got.maps, ref.maps):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_session_memory_arena_is_a_choice(tmp_path):
    """The server turns ONNX Runtime's memory arena off (serve --memory-arena turns it back on)."""
    import onnx
    from onnx import TensorProto, helper

    from insightad.apps.serve.settings import ServeParams
    from insightad.engines.onnx_runtime import make_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert make_session(str(path)).get_session_options().enable_cpu_mem_arena
    assert not make_session(str(path), arena=False).get_session_options().enable_cpu_mem_arena
    assert ServeParams().memory_arena is False


def test_export_builds_the_ready_copy_from_an_external_data_twin_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """The verified export's ready copy comes from a twin with the constants outside the protobuf (ONNX Runtime
    then holds each once); the twin is gone afterwards, and the file itself still opens on its own."""
    import torch

    from insightad.engines import cache
    from insightad.engines.cache import ready_copy
    from insightad.engines.export import example_batches, export_verified
    from insightad.engines.onnx_runtime import make_session

    built_from = []
    build = cache._build_ready
    monkeypatch.setattr(cache, "_build_ready", lambda graph, folder: built_from.append(graph) or build(graph, folder))

    class Tiny(torch.nn.Module):  # the exporter's modules return a tuple of outputs
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (torch.relu(self.conv(x)),)

    module = Tiny().eval()
    out = export_verified(module, example_batches((3, 8, 8)), ["y"], "tiny", tmp_path / "tiny.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    assert len(built_from) == 1 and ".twin." in built_from[0].parent.name  # the twin, once
    ready = ready_copy(out)
    assert ready is not None and ready.is_file()
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32) * 255
    want = module(torch.from_numpy(x))[0].detach().numpy()
    for sess in (make_session(str(out)), make_session(str(ready))):
        np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], want, rtol=1e-4, atol=1e-3)


def test_export_without_room_for_the_twin_still_exports_and_verifies(tmp_path, monkeypatch):
    """Writing the twin fails (a full disk, say): the file is still written and checked, its ready copy built
    from the file itself, and no part of the twin is left."""
    import torch

    from insightad.engines import export

    def no_room(proto, path, weights):
        path.with_name(path.name + ".data").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_external", no_room)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    wrapped = type("One", (torch.nn.Module,), {"forward": lambda self, x: (module(x),)})()
    wrapped.add_module("inner", module)
    out = export.export_verified(wrapped.eval(), export.example_batches((3, 4, 4)), ["y"], "tiny", tmp_path / "t.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]
    assert out.is_file()


def test_graph_of_an_older_revision_is_stale_beside_and_warned_alone(baseline_model, images, tmp_path, monkeypatch):
    """A graph exported before the current graph revision (what the graph computes changed: tiles, flat regions) is
    never taken as the model's own graph (rebuilt in the cache instead), and given alone it scores with a warning."""
    import shutil
    import warnings

    import onnx as onnx_lib

    from insightad.engines.checksum import CONTENT_KEY
    from insightad.engines.onnx_runtime import REVISION_KEY

    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    graph = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model), "--out", str(graph)]) == 0
    proto = onnx_lib.load(str(graph))
    assert {p.key: p.value for p in proto.metadata_props}[REVISION_KEY] == "2"
    kept = [p for p in proto.metadata_props if p.key not in (REVISION_KEY, CONTENT_KEY)]  # as exported before both
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx_lib.save(proto, str(graph))
    with pytest.warns(UserWarning, match="not the graph of"):
        det = load_for_inference(model, "onnx")
    ref = load_for_inference(model, "torch").predict(images).scores
    np.testing.assert_allclose(det.predict(images).scores, ref, rtol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = load_for_inference(graph)
    assert any("graph revision 1; now 2" in str(w.message) for w in caught)
    np.testing.assert_allclose(alone.predict(images).scores, ref, rtol=1e-4)
    # Where nothing can rebuild it (a runtime-only install), this model's own graph of an older revision still
    # serves, with a warning to refresh it; a full install rebuilds instead.
    from insightad.inference import export as export_module
    from insightad.inference.export import stored_engine
    from insightad.inference.load import stored_graph
    from insightad.model_file import read_metadata

    shutil.rmtree(tmp_path / "cache")
    with pytest.warns(UserWarning, match="not the graph of"):
        assert stored_engine(model) is None
    monkeypatch.setattr(export_module, "torch_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert stored_graph(model, read_metadata(model)) is not None
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "exported by an older InsightAD" in said[0], said  # one line, not one per layer


def test_export_shape_inference_is_not_handed_large_constants(tmp_path, monkeypatch):
    """The exporter's shape inference copied every parameter into a protobuf tensor (PaDiM's 236 MB factors once
    more, train's peak): large ones are held back from it, and the graph written is the same, byte for byte."""
    import contextlib

    import torch

    from insightad.engines import export

    monkeypatch.setattr(export, "LARGE_CONSTANT", 200)
    name = "_jit_pass_onnx_graph_shape_type_inference"
    seen: list[int] = []
    original = getattr(torch._C, name)
    monkeypatch.setattr(torch._C, name, lambda graph, params, *rest: seen.extend(v.numel() for v in params.values())
                        or original(graph, params, *rest))
    module, example = _big_buffer_module(), torch.zeros(1, 3, 8, 8)
    export._to_onnx(module, example, ["y"], tmp_path / "held.onnx", "x")
    assert seen and max(seen) < 200  # the conv's weights and bias went in, the 256-element buffer did not
    monkeypatch.setattr(export, "_shape_inference_without_large_constants", contextlib.nullcontext)
    seen.clear()
    export._to_onnx(module, example, ["y"], tmp_path / "all.onnx", "x")
    assert max(seen) == 256
    assert (tmp_path / "held.onnx").read_bytes() == (tmp_path / "all.onnx").read_bytes()
    assert getattr(torch._C, name) is not None


def _big_buffer_module():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("big", torch.randn(4, 8, 8))  # 256 elements: "large" below

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (torch.relu(self.conv(x)) * self.big,)

    return Tiny().eval()


def test_a_released_module_is_checked_against_its_outputs_taken_before(tmp_path, monkeypatch):
    """``release``: the module's large tensors go once its graph is written and its outputs taken (train's and
    export's last use of the model: ONNX Runtime's copy of PaDiM's factors never sits beside PyTorch's); the
    graph is still checked against the module's own outputs, and keeps every constant."""
    import torch

    from insightad.engines import export
    from insightad.engines.onnx_runtime import make_session

    monkeypatch.setattr(export, "LARGE_CONSTANT", 200)
    module = _big_buffer_module()
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32) * 255
    want = module(torch.from_numpy(x))[0].detach().numpy()
    released: list[int] = []
    release = export.release_large_tensors
    monkeypatch.setattr(export, "release_large_tensors", lambda m: released.append(release(m)) or released[-1])
    out = export.export_verified(module, export.example_batches((3, 8, 8)), ["y"], "tiny", tmp_path / "t.onnx",
                                 release=True)
    assert released == [256 * 4] and module.big.numel() == 0 and module.conv.weight.numel() == 4 * 3 * 9
    sess = make_session(str(out))
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], want, rtol=1e-4, atol=1e-3)

    # A graph that does not reproduce the module is still refused after the module was released.
    module = _big_buffer_module()
    finish = export._finish

    def wrong_constant(path, module, *args, **kwargs):
        with torch.no_grad():
            module.big.add_(1.0)  # what is written differs from what the outputs were taken from
            try:
                finish(path, module, *args, **kwargs)
            finally:
                module.big.sub_(1.0)

    monkeypatch.setattr(export, "_finish", wrong_constant)
    with pytest.raises(InsightADError, match="disagrees with PyTorch"):
        export.export_verified(module, export.example_batches((3, 8, 8)), ["y"], "tiny", tmp_path / "w.onnx",
                               release=True)
    assert not (tmp_path / "w.onnx").exists()
