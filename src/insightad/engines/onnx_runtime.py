"""The ONNX Runtime engine: runs an exported graph on decoded uint8 images; refuses foreign ONNX files."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from insightad.engines.cache import ready_copy
from insightad.engines.checksum import check_content
from insightad.errors import InsightADError
from insightad.io import is_safetensors_file, require_file

META_KEY = "insightad"  # the metadata entry of an InsightAD graph
ONNX_FORMAT = "insightad-onnx"  # the format name in an exported model's metadata
DEFAULT_THREADS = None  # ONNX Runtime's own choice: one per physical core
CACHE_KEY = "insightad_model_sha256"  # metadata of a cached graph: the sha256 of the model file it was made from
LAYOUT_KEY = "insightad_graph_layout"  # metadata: what the graph takes; a graph of another layout is rebuilt
GRAPH_LAYOUT = "uint8-any-size-resize-inside"
# What the graph computes, within its layout: a graph beside a model file or in the cache made at another
# revision is stale (rebuilt); a bare one is used with a warning. 2: tiled graphs take every tile they are given
# (they lost those past 16 a call) and a flat region's pooled spread is zero on both engines.
REVISION_KEY = "insightad_graph_revision"
GRAPH_REVISION = "2"
RUN_VALUES = 24_000_000  # input values per session run at most (nine 900 x 900 RGB photos); see _run_stack


def is_onnx_file(path: str | Path) -> bool:
    """Whether ``--model PATH`` is taken as an ONNX graph: a ``.onnx`` name, unless the content is a safetensors
    file (a model file renamed ``.onnx`` is the model file it is, not a graph that fails to parse)."""
    return str(path).lower().endswith(".onnx") and not is_safetensors_file(path)


def make_session(model: bytes | str, threads: int | None = DEFAULT_THREADS, arena: bool = True, ready: bool = False):
    """A CPU session; ``arena=False`` turns off ONNX Runtime's memory arena (less resident memory, a
    little slower: what a long-running server wants). ``ready``: open the graph file through its
    session-ready copy (``engines.cache``: optimised, constants mapped; made on first use)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No busy-waiting between calls: the cores are shared with the image-decoding workers.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, str):
        copy = ready_copy(model) if ready else None  # checks the graph's content checksum before making it
        if copy is not None:
            try:
                return ort.InferenceSession(str(copy), so, providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - pruned by another process since it was found: open the graph itself
                pass
        check_content(model)  # opened the slow way: checked every time
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class OnnxEngine:
    """An exported whole-model graph on ONNX Runtime: decoded uint8 images (N, C, H, W) at their own size in
    (the graph resizes them itself), (scores, maps at model size) out. numpy in, numpy out: the runtime
    install (no PyTorch, no onnx package) uses it."""

    takes_original = True  # feed decoded images at their own size, not images resized in Python

    def __init__(self, model: bytes | str, threads: int | None = DEFAULT_THREADS, arena: bool = True,
                 ready: bool = True) -> None:
        self.session = make_session(model, threads, arena, ready)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name

    def _run_stack(self, x: np.ndarray) -> list[np.ndarray]:
        """One stack of same-size images, run in equal slices of at most ``RUN_VALUES`` input values. The
        graph's float copy of a large original (before its resize) is 4 bytes a value and ONNX Runtime keeps
        its largest buffers for the next call (sixteen 900 px photos in one run: 300 MB held for good), while
        each run reads every constant of the model once (PaDiM: 236 MB of inverse factors), so runs of one
        or three photos cost more per image. Measured on bottle, 83 photos: 3 per run 2.8-3.1 s and 529 MB
        peak, 8 per run 2.3-2.4 s and 583 MB, 16 per run 2.5-2.7 s and 815 MB."""
        if x.dtype != np.uint8:  # float pixels (already at model size): the graph takes levels 0..255
            x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        most = max(1, RUN_VALUES // max(1, int(np.prod(x.shape[1:]))))
        runs = -(-len(x) // most)
        step = -(-len(x) // runs)  # equal slices: 16 photos go as 8 + 8, not 9 + 7
        if len(x) <= step:
            return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})
        parts = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + step])})
                 for i in range(0, len(x), step)]
        return self._joined(parts)

    def run(self, images: Any) -> list[np.ndarray]:
        """A batch (N, C, H, W) or a list of (C, H, W) images of any sizes (runs of same-size images are
        stacked) -> the graph's outputs for all of them, in order."""
        if not isinstance(images, (list, tuple)):
            return self._run_stack(np.asarray(images))
        parts: list[list[np.ndarray]] = []
        i = 0
        while i < len(images):
            j = i + 1
            while j < len(images) and images[j].shape == images[i].shape:
                j += 1
            parts.append(self._run_stack(np.stack([np.asarray(a) for a in images[i:j]])))
            i = j
        return self._joined(parts) if parts else []

    def _joined(self, parts: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Each output of consecutive runs, joined along the batch."""
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]

    def __call__(self, x: Any) -> tuple[np.ndarray, ...]:
        return tuple(self.run(x))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The InsightAD metadata of an ONNX file checked against its graph's input, or a clear refusal; read from the
    file's protobuf fields (``metadata_props``, ``graph_inputs``): the graph is not loaded."""
    path = require_file(path, "ONNX file")
    check_content(path)
    try:
        props, inputs = metadata_props(path), graph_inputs(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InsightADError(f"{path}: not a readable ONNX file ({e})") from None
    return check_props(props, inputs, path)


def _read_varint(f: Any) -> int | None:
    """The next protobuf varint read from file ``f`` (None at the end of the file)."""
    value, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


_METADATA_FIELD = 14  # ModelProto.metadata_props (StringStringEntryProto: key = 1, value = 2)
_MAX_FIELD = 16 * 1024**2  # a metadata field larger than this is not one an exporter of ours wrote


def _fields(f: Any, wanted: frozenset[int], spans: frozenset[int] = frozenset(), end: int | None = None
            ) -> Iterator[tuple[int, Any]]:
    """(field number, value) of the fields of the protobuf message read from ``f`` (up to byte ``end``) whose numbers
    are ``wanted``: bytes for length-delimited fields, ints for varints. Fields in ``spans`` are yielded as (offset,
    size) with the file at the offset, for the caller to walk in place (a graph: never read whole); every other
    field is skipped by seeking past it (a graph's constants are never read). ValueError for what is not a protobuf
    message, or stops short."""
    while (end is None or f.tell() < end) and (tag := _read_varint(f)) is not None:
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value = _read_varint(f)
            if field in wanted:
                yield field, value
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            size = _read_varint(f)
            if size is None:
                raise ValueError("truncated field")
            if field in spans:
                at = f.tell()
                yield field, (at, size)
                f.seek(at + size)
            elif field not in wanted:
                f.seek(size, 1)
            else:
                if size > _MAX_FIELD:
                    raise ValueError("metadata field too large")
                data = f.read(size)
                if len(data) != size:
                    raise ValueError("truncated field")
                yield field, data
        else:
            raise ValueError(f"unexpected wire type {wire}")
    if f.tell() > f.seek(0, 2):  # a field's length ran past the end
        raise ValueError("truncated file")


def metadata_props(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata (key -> value), read by walking the ModelProto's top-level fields and seeking past
    the graph: reading one stamp costs no parse of the constants (ONNX Runtime loading PaDiM's graph to read it
    held 400 MB more). Raises ValueError/OSError for a file that is not a protobuf message."""
    props: dict[str, str] = {}
    with open(path, "rb") as f:
        for _, entry in _fields(f, frozenset({_METADATA_FIELD})):
            parts = dict(_message(entry, frozenset({1, 2})))
            props[parts.get(1, b"").decode("utf-8")] = parts.get(2, b"").decode("utf-8")
    return props


_GRAPH_FIELD, _GRAPH_INPUT = 7, 11  # ModelProto.graph, GraphProto.input (ValueInfoProto: name = 1, type = 2)
_ELEM_TYPES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "double"}  # TensorProto.DataType, named as ONNX Runtime names input types


def _message(data: bytes, wanted: frozenset[int]) -> list[tuple[int, Any]]:
    """The ``wanted`` fields of a small protobuf message held in memory."""
    import io

    return list(_fields(io.BytesIO(data), wanted))


def _value_info(data: bytes) -> tuple[str, str, list[int | str | None]]:
    """(name, 'tensor(<element type>)', dims: int, a symbolic name, or None) of a ValueInfoProto."""
    parts = dict(_message(data, frozenset({1, 2})))
    tensor = dict(_message(parts.get(2, b""), frozenset({1}))).get(1, b"")  # TypeProto.tensor_type
    kind = dict(_message(tensor, frozenset({1, 2})))  # elem_type, shape
    dims: list[int | str | None] = []
    for _, dim in _message(kind.get(2, b""), frozenset({1})):  # TensorShapeProto.dim
        d = dict(_message(dim, frozenset({1, 2})))  # dim_value, dim_param
        dims.append(int(d[1]) if 1 in d else d[2].decode("utf-8") if 2 in d else None)
    elem = int(kind.get(1, 0))
    return parts.get(1, b"").decode("utf-8"), f"tensor({_ELEM_TYPES.get(elem, f'type {elem}')})", dims


def graph_inputs(path: str | Path) -> dict[str, tuple[str, list[int | str | None]]]:
    """The graph's inputs (name -> (type, dims)) as ONNX Runtime reports them, read by walking the file's protobuf
    fields in place: the graph's nodes and constants are skipped, never parsed (``info`` on a PaDiM graph loaded
    it whole in ONNX Runtime, ~500 MB, to check one input). Raises ValueError/OSError for what is not a model."""
    out: dict[str, tuple[str, list[int | str | None]]] = {}
    with open(path, "rb") as f:
        for _, (at, size) in _fields(f, frozenset(), spans=frozenset({_GRAPH_FIELD})):
            for _, data in _fields(f, frozenset({_GRAPH_INPUT}), end=at + size):
                name, kind, dims = _value_info(data)
                out[name] = (kind, dims)
    return out


def read_stamp(path: str | Path) -> str | None:
    """The model sha256 stamped in an InsightAD graph file (lower case), without loading the graph; None for no
    file, a damaged one (content checksum, truncated) or one that is not an InsightAD graph."""
    try:
        check_content(path)
        props = metadata_props(path)
        meta = json.loads(props.get(META_KEY, "null"))
    except (InsightADError, OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        return None
    stamp = props.get(CACHE_KEY)
    return stamp.lower() if stamp else None


def check_metadata(session: Any, path: str | Path) -> dict[str, Any]:
    """The InsightAD metadata of a loaded session, checked against its graph's input, or a clear refusal."""
    inputs = {i.name: (i.type, list(i.shape)) for i in session.get_inputs()}
    return check_props(session.get_modelmeta().custom_metadata_map, inputs, path)


def check_props(props: dict[str, str], inputs: dict[str, tuple[str, list[Any]]], path: str | Path) -> dict[str, Any]:
    """The InsightAD metadata of a graph (its metadata entries, its inputs: name -> (type, dims)), checked against
    its 'images' input, or a clear refusal."""
    try:
        meta = json.loads(props[META_KEY])
        assert isinstance(meta, dict) and meta.get("format") == ONNX_FORMAT
    except (KeyError, ValueError, AssertionError):
        raise InsightADError(f"{path}: not an InsightAD ONNX export (no '{META_KEY}' metadata); "
                             "export one with 'insightad export'") from None
    # The stamps as the code reads them (graph_stamp: the plain keys; no revision key: revision 1), so what info
    # shows is what decides, also for a graph exported before the JSON entry carried them.
    meta = {**meta, LAYOUT_KEY: props.get(LAYOUT_KEY), REVISION_KEY: props.get(REVISION_KEY, "1"),
            CACHE_KEY: props.get(CACHE_KEY)}
    if props.get(LAYOUT_KEY) != GRAPH_LAYOUT:
        raise InsightADError(f"{path}: an InsightAD ONNX export of an older layout (it takes images already "
                             "resized); export the model again with 'insightad export'")
    if props.get(REVISION_KEY) != GRAPH_REVISION:
        warnings.warn(f"{path}: exported by an older InsightAD ({meta.get('package_version', '?')}, graph revision "
                      f"{props.get(REVISION_KEY, '1')}; now {GRAPH_REVISION}): its scores can differ from the model "
                      "file's (tiled graphs on batches past 16 tiles, baseline and SVDD on flat areas); export the "
                      "model again with 'insightad export'", stacklevel=2)
    if "images" not in inputs:
        raise InsightADError(f"{path}: ONNX graph has no 'images' input; its metadata does not match the graph")
    kind, dims = inputs["images"]
    any_size = len(dims) == 4 and not any(isinstance(d, int) for d in dims[2:])  # must take any H, W
    if kind != "tensor(uint8)" or not any_size or dims[1] != meta.get("channels"):
        raise InsightADError(f"{path}: graph input is not uint8 N x {meta.get('channels')} x H x W (any H, W) as its "
                             "metadata says; refusing a file whose metadata does not match its graph")
    return meta


def graph_stamp(engine: OnnxEngine) -> tuple[str | None, str | None, str]:
    """(model sha256, graph layout, graph revision) stamped in a graph's metadata (revision 1: before the key)."""
    props = engine.session.get_modelmeta().custom_metadata_map
    return props.get(CACHE_KEY), props.get(LAYOUT_KEY), props.get(REVISION_KEY, "1")


def verified_entry(target: Path, digest: str, threads: int | None, delete: bool = True, arena: bool = True,
                   older: bool = False) -> OnnxEngine | None:
    """The engine of a graph file whose stamp names this model file's content and today's layout; None for a
    missing, damaged (truncated, not ONNX), stale or foreign file (another model's graph), which is never
    used (and deleted when ``delete``: cache entries). ``older``: a graph of this model at an older revision of
    today's layout is taken too (where nothing can rebuild it; ``check_metadata`` says so when it is read)."""
    if not target.is_file():
        return None
    try:
        engine: OnnxEngine | None = OnnxEngine(str(target), threads, arena)
        stamp, layout, revision = graph_stamp(engine) if engine else (None, None, None)
    except Exception:  # noqa: BLE001 - ONNX Runtime raises several types for a damaged file
        stamp, layout, revision, engine = None, None, None, None
    if stamp != digest or layout != GRAPH_LAYOUT or (revision != GRAPH_REVISION and not older):
        if delete:
            target.unlink(missing_ok=True)
        return None
    return engine
