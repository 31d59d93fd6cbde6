"""A fitted detector -> one ONNX graph: uint8 images at the model's input size in, scores (and maps)
out, normalisation inside; threshold, its scale and the preprocessing ride along as metadata. The
graph is verified against PyTorch (``engines.export``) before anything is written or cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from insightad.engines.export import ONNX_FORMAT, example_batches, export_verified
from insightad.engines.onnx_runtime import (
    CACHE_KEY,
    GRAPH_LAYOUT,
    LAYOUT_KEY,
    OnnxEngine,
    cache_dir,
    file_digest,
    prune_cache,
    verified_entry,
)
from insightad.errors import InsightADError
from insightad.io import atomic_write_bytes
from insightad.methods.base import Detector
from insightad.version import __version__

FLAT_KEYS = ("threshold", "input_height", "input_width", "resize", "method")


def onnx_metadata(det: Detector) -> dict[str, Any]:
    """What a user of the graph in another language needs: input size, resize filter, threshold and
    the scale that turns a score into ``score_normalized``."""
    p = det.preprocessing_
    info = getattr(det, "threshold_info_", {}) or {}
    return {"format": ONNX_FORMAT, "package_version": __version__, "method": det.method,
            "has_maps": bool(det.has_maps), "threshold": det.threshold_,
            "threshold_strategy": det.threshold_strategy_, "threshold_details": info,
            "input_height": p.size[0], "input_width": p.size[1],
            "channels": p.channels, "resize": p.resize, "mean": list(p.mean), "std": list(p.std),
            "input": "uint8 NCHW (channels RGB or L), already resized to input_height x input_width",
            "outputs": ["scores"] + (["maps"] if det.has_maps else []), "backbone": getattr(det, "backbone", None)}


def export_bytes(det: Detector, verify: bool = True, stamp: dict[str, str] | None = None) -> bytes:
    """The ONNX graph of ``det`` as bytes, with metadata (plus ``stamp``'s entries: the cache's key);
    raises if it cannot be exported faithfully."""
    det._check_fitted()
    if det.onnx_unsupported:
        raise InsightADError(f"{det.method}: cannot export to ONNX: {det.onnx_unsupported}")
    if det.model_ is None:
        raise InsightADError(f"{det.method}: this detector runs from an ONNX graph already; nothing to export")
    p = det.preprocessing_
    outputs = ["scores"] + (["maps"] if det.has_maps else [])
    meta = {**onnx_metadata(det), LAYOUT_KEY: GRAPH_LAYOUT, **(stamp or {})}
    # A model whose PyTorch path approximates (PatchCore's HNSW search) exports its exact twin.
    exported = getattr(det.model_, "exported", None)
    module = exported() if callable(exported) else det.model_
    return export_verified(module, example_batches((p.channels, *p.size)), outputs, det.method,
                           metadata=meta, flat_keys=(*FLAT_KEYS, LAYOUT_KEY, *(stamp or {})), check=verify)


def export_onnx(det: Detector, out: str | Path, model_path: str | Path | None = None) -> Path:
    """Write the verified ONNX file atomically; stamped with the sha256 of ``model_path`` (the model file it
    is made from) when given, so that scoring that model file finds and uses it without PyTorch."""
    data = export_bytes(det, stamp={CACHE_KEY: file_digest(model_path)} if model_path is not None else None)
    out = Path(out)
    atomic_write_bytes(out, data)
    return out


def cached_engine(det: Detector, model_path: str | Path, threads: int | None = None) -> OnnxEngine:
    """An ONNX Runtime engine for the model file at ``model_path``: its graph is exported once and cached,
    keyed by the sha256 of the model file's content and stamped with it; an entry whose stamp does not match
    (truncated, swapped, damaged) is rebuilt from the PyTorch model, or refused where there is none."""
    digest = file_digest(model_path)
    target = cache_dir() / f"{digest}.onnx"
    if target.exists():
        engine = verified_entry(target, digest, threads)
        if engine is not None:
            return engine
    if getattr(det, "model_", None) is None:
        raise InsightADError(f"{target}: cached ONNX graph for {model_path} is missing, damaged or made from "
                             "another model, and PyTorch is not available to rebuild it; install insightad[train] "
                             "or export the model with 'insightad export' where PyTorch is installed")
    data = export_bytes(det, stamp={CACHE_KEY: digest})
    try:
        atomic_write_bytes(target, data)
        prune_cache(keep=target)
    except OSError:
        pass  # a read-only home is no reason to fail a prediction
    return OnnxEngine(data, threads)
