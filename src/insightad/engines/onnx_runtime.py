"""The ONNX Runtime engine: runs an exported graph on uint8 batches; refuses foreign ONNX files.

numpy in, numpy out, and onnxruntime alone: the runtime install (no PyTorch, no onnx package) uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from insightad.errors import InsightADError
from insightad.io import file_sha256 as file_digest  # noqa: F401 - the cache key

META_KEY = "insightad"  # the metadata entry of an InsightAD graph
ONNX_FORMAT = "insightad-onnx"  # the format name in an exported model's metadata
DEFAULT_THREADS = None  # ONNX Runtime's own choice: one per physical core


def make_session(model: bytes | str, threads: int | None = DEFAULT_THREADS):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No busy-waiting between calls: the cores are shared with the image-decoding workers.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class OnnxEngine:
    """Callable like a model: uint8 (B, C, H, W) array -> (scores, maps) numpy arrays."""

    def __init__(self, model: bytes | str, threads: int | None = DEFAULT_THREADS) -> None:
        self.session = make_session(model, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]
        images = next((i for i in self.session.get_inputs() if i.name == "images"), None)
        # uint8 input: decoded images at their own size (the graph resizes); float: pixels already at model size
        self.decoded_input = images is not None and images.type == "tensor(uint8)"
        self.dtype = np.uint8 if self.decoded_input else np.float32

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {"images": np.ascontiguousarray(x, dtype=self.dtype)}))

    def made_from(self, digest: str) -> bool:
        """Whether this graph is stamped as made from the model file whose sha256 is ``digest``, in the layout
        this version makes (a graph of another layout is stale)."""
        props = self.session.get_modelmeta().custom_metadata_map
        return props.get(CACHE_KEY) == digest and props.get(LAYOUT_KEY) == GRAPH_LAYOUT


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The InsightAD metadata of an ONNX file, or a clear refusal (read by ONNX Runtime, graph not optimised)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InsightADError(f"{path}: ONNX file not found")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises several types for a damaged file
        raise InsightADError(f"{path}: not a readable ONNX file ({(str(e).splitlines() or [''])[0][:120]})") from None
    return check_metadata(session, path)


def check_metadata(session: Any, path: str | Path) -> dict[str, Any]:
    """The InsightAD metadata of a loaded session, checked against its graph's input, or a clear refusal."""
    props = session.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props[META_KEY])
        assert isinstance(meta, dict) and meta.get("format") == ONNX_FORMAT
    except (KeyError, ValueError, AssertionError):
        raise InsightADError(f"{path}: not an InsightAD ONNX export (no '{META_KEY}' metadata); "
                             "export one with 'insightad export'") from None
    inputs = {i.name: i for i in session.get_inputs()}
    if "images" not in inputs:
        raise InsightADError(f"{path}: ONNX graph has no 'images' input; its metadata does not match the graph")
    dims = list(inputs["images"].shape)
    expected = [meta["channels"], meta["input_height"], meta["input_width"]]
    if dims[1:] != expected:
        raise InsightADError(f"{path}: graph input is {dims[1:]} but the metadata says {expected}; refusing "
                             "a file whose metadata does not match its graph")
    return meta


def cache_dir() -> Path:
    base = os.environ.get("INSIGHTAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "insightad")
    return Path(base) / "onnx"


CACHE_LIMIT_BYTES = 2 * 1024**3


def prune_cache(keep: Path | None = None, limit: int = CACHE_LIMIT_BYTES) -> None:
    """Delete the least recently used exports beyond ``limit`` bytes (never ``keep``)."""
    try:
        files = sorted(cache_dir().glob("*.onnx"), key=lambda f: f.stat().st_atime, reverse=True)
        total = 0
        for f in files:
            total += f.stat().st_size
            if total > limit and f != keep:
                f.unlink(missing_ok=True)
    except OSError:
        pass


CACHE_KEY = "insightad_model_sha256"  # metadata of a cached graph: the sha256 of the model file it was made from
LAYOUT_KEY = "insightad_graph_layout"  # metadata: what the graph takes; a graph of another layout is rebuilt
GRAPH_LAYOUT = "float32-model-size"


def verified_entry(target: Path, digest: str, threads: int | None) -> OnnxEngine | None:
    """The engine of a cache entry whose stamp names this model file's content; None for a missing, damaged
    (truncated, not ONNX) or foreign entry (another model's graph), which is then deleted, never used."""
    try:
        data = target.read_bytes()
    except OSError:
        return None
    try:
        engine: OnnxEngine | None = OnnxEngine(data, threads)
        ok = engine is not None and engine.made_from(digest)
    except Exception:  # noqa: BLE001 - ONNX Runtime raises several types for a damaged file
        ok, engine = False, None
    if not ok:
        target.unlink(missing_ok=True)
        return None
    return engine
