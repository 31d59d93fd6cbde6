"""Export a fitted detector's pure-tensor model to one ONNX graph: uint8 images at the model's
input size in, scores (and maps) out, normalisation inside; threshold and preprocessing ride along
as metadata. The export is verified against PyTorch before the file is written."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insightad import __version__
from insightad.errors import InsightADError

ONNX_FORMAT = "insightad-onnx"
META_KEY = "insightad"
PARITY_RTOL = 1e-4
OPSET = 17


def onnx_metadata(det) -> dict[str, Any]:
    """What a user of the graph in another language needs: input size, resize filter, threshold."""
    p = det.preprocessing_
    return {"format": ONNX_FORMAT, "package_version": __version__, "method": det.method,
            "has_maps": bool(det.has_maps), "threshold": det.threshold_,
            "threshold_strategy": det.threshold_strategy_, "input_height": p.size[0], "input_width": p.size[1],
            "channels": p.channels, "resize": p.resize, "mean": list(p.mean), "std": list(p.std),
            "input": "uint8 NCHW (channels RGB or L), already resized to input_height x input_width",
            "outputs": ["scores"] + (["maps"] if det.has_maps else []), "backbone": getattr(det, "backbone", None)}


def _export_bytes(model: torch.nn.Module, dummy: torch.Tensor, outputs: list[str]) -> bytes:
    dynamic = {"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buf, input_names=["images"], output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def export_bytes(det, verify: bool = True, stamp: dict[str, str] | None = None) -> bytes:
    """The ONNX graph of ``det`` as bytes, with metadata (plus ``stamp``'s entries: the cache's key);
    raises if it cannot be exported faithfully."""
    import onnx

    det._check_fitted()
    model = det.model_
    if getattr(model, "onnx_unsupported", None):
        raise InsightADError(f"{det.method}: cannot export to ONNX: {model.onnx_unsupported}")
    model = model.to("cpu").eval()
    p = det.preprocessing_
    gen = torch.Generator().manual_seed(0)
    dummy = torch.randint(0, 256, (2, p.channels, *p.size), dtype=torch.uint8, generator=gen)
    outputs = ["scores"] + (["maps"] if det.has_maps else [])
    try:
        raw = _export_bytes(model, dummy, outputs)
    except Exception as e:  # noqa: BLE001 - report which part failed, never write a broken file
        raise InsightADError(f"{det.method}: the model graph could not be exported to ONNX "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    proto = onnx.load_from_string(raw)
    del raw  # large models (PaDiM's per-patch factors): keep one copy of the weights at a time
    del proto.metadata_props[:]
    meta = onnx_metadata(det)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    for key, value in [*((k, meta[k]) for k in ("threshold", "input_height", "input_width", "resize", "method")),
                       *(stamp or {}).items()]:
        e = proto.metadata_props.add()
        e.key, e.value = key, str(value)
    data = proto.SerializeToString()
    del proto
    if verify:  # two batch sizes: a graph that baked in the export's batch size fails here, not later
        check_parity(det, data, [dummy, torch.randint(0, 256, (3, p.channels, *p.size), dtype=torch.uint8,
                                                       generator=gen)])
    return data


def check_parity(det, data: bytes, batches: list[torch.Tensor]) -> None:
    """ONNX Runtime must reproduce PyTorch's scores (and maps) within 1e-4 relative, at every batch size."""
    from insightad.engines.onnx_runtime import make_session

    sess = make_session(data, threads=None)
    for images in batches:
        try:
            got = sess.run(None, {"images": images.numpy()})
        except Exception as e:  # noqa: BLE001 - e.g. a shape baked in at export
            raise InsightADError(f"{det.method}: the exported ONNX graph fails on a batch of {len(images)} "
                                 f"({str(e).splitlines()[0][:160]}); not written") from None
        with torch.inference_mode():
            ref = [t.float().numpy() for t in det.model_(images)]
        for name, a, b in zip(["scores", "maps"], ref, got):
            scale = max(float(np.abs(a).max()), 1e-12)
            err = float(np.abs(a - b).max()) / scale
            if not np.isfinite(err) or err > PARITY_RTOL:
                raise InsightADError(f"{det.method}: the exported ONNX graph disagrees with PyTorch on {name} "
                                     f"(relative error {err:.2e} > {PARITY_RTOL:g}); not written")


def export_onnx(det, out: str | Path) -> Path:
    """Write the verified ONNX file atomically."""
    from insightad.model_file import atomic_write

    data = export_bytes(det)
    out = Path(out)
    atomic_write(out, lambda tmp: tmp.write_bytes(data))
    return out
