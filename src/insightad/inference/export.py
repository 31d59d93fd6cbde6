"""A fitted detector -> one ONNX graph: uint8 images at the model's input size in, scores (and maps)
out, normalisation inside; threshold, its scale and the preprocessing ride along as metadata. The
graph is verified against PyTorch (``engines.export``) before anything is written or cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from insightad.engines.export import ONNX_FORMAT, example_batches, export_verified
from insightad.engines.onnx_runtime import cache_dir, file_digest, prune_cache
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


def export_bytes(det: Detector, verify: bool = True) -> bytes:
    """The ONNX graph of ``det`` as bytes, with metadata; raises if it cannot be exported faithfully."""
    det._check_fitted()
    if det.onnx_unsupported:
        raise InsightADError(f"{det.method}: cannot export to ONNX: {det.onnx_unsupported}")
    if det.model_ is None:
        raise InsightADError(f"{det.method}: this detector runs from an ONNX graph already; nothing to export")
    p = det.preprocessing_
    outputs = ["scores"] + (["maps"] if det.has_maps else [])
    return export_verified(det.model_, example_batches((p.channels, *p.size)), outputs, det.method,
                           metadata=onnx_metadata(det), flat_keys=FLAT_KEYS, check=verify)


def export_onnx(det: Detector, out: str | Path) -> Path:
    """Write the verified ONNX file atomically."""
    data = export_bytes(det)
    out = Path(out)
    atomic_write_bytes(out, data)
    return out


def cached_export(det: Detector, model_path: str | Path | None) -> bytes:
    """The model's ONNX graph, exported once per model file and cached (keyed by its content)."""
    if model_path is None:
        return export_bytes(det)
    target = cache_dir() / f"{file_digest(model_path)}.onnx"
    if target.is_file():
        return target.read_bytes()
    data = export_bytes(det)
    try:
        atomic_write_bytes(target, data)
        prune_cache(keep=target)
    except OSError:
        pass  # a read-only home is no reason to fail a prediction
    return data
