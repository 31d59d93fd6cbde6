"""The one export-and-verify routine: a PyTorch module -> ONNX bytes that ONNX Runtime has been seen
to reproduce (within ``rtol`` relative, at every batch given) before anyone uses them.

Used for whole models (``insightad export``, the inference cache) and for the fit-time backbone
graphs alike. It knows modules and tensors, not Detectors.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from insightad.engines.onnx_runtime import META_KEY, ONNX_FORMAT, make_session
from insightad.errors import InsightADError

__all__ = ["META_KEY", "ONNX_FORMAT", "example_batches", "export_verified", "verify"]

OPSET = 17
PARITY_RTOL = 1e-4


def _to_onnx(module: nn.Module, example: torch.Tensor, outputs: Sequence[str]) -> bytes:
    dynamic = {"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch's annotation omits file-like objects, which the TorchScript exporter (dynamo=False) accepts
        torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=list(outputs),  # type: ignore[arg-type]
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def _with_metadata(raw: bytes, metadata: dict[str, Any], flat_keys: Sequence[str]) -> bytes:
    """The graph with our metadata: one JSON entry plus a few plain keys other tools can show."""
    import onnx

    proto = onnx.load_from_string(raw)
    del raw  # large models (PaDiM's per-patch factors): keep one copy of the weights at a time
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(metadata)
    for key in flat_keys:
        e = proto.metadata_props.add()
        e.key, e.value = key, str(metadata[key])
    return proto.SerializeToString()


def verify(module: nn.Module, data: bytes, batches: Sequence[torch.Tensor], what: str,
           rtol: float = PARITY_RTOL) -> None:
    """ONNX Runtime must reproduce every output of ``module`` within ``rtol`` (relative to the output's
    largest magnitude) on every batch; otherwise one line saying which output and by how much."""
    sess = make_session(data, threads=None)
    names = [o.name for o in sess.get_outputs()]
    for images in batches:
        try:
            got = sess.run(None, {"images": images.numpy()})
        except Exception as e:  # noqa: BLE001 - e.g. a shape baked in at export
            raise InsightADError(f"{what}: the exported ONNX graph fails on a batch of {len(images)} "
                                 f"({str(e).splitlines()[0][:160]}); not used") from None
        with torch.inference_mode():
            ref = [t.float().numpy() for t in module(images)]
        for name, a, b in zip(names, ref, got):
            scale = max(float(np.abs(a).max()), 1e-12)
            err = float(np.abs(a - b).max()) / scale
            if not np.isfinite(err) or err > rtol:
                raise InsightADError(f"{what}: the exported ONNX graph disagrees with PyTorch on {name} "
                                     f"(relative error {err:.2e} > {rtol:g}); not used")


def export_verified(module: nn.Module, batches: Sequence[torch.Tensor], outputs: Sequence[str], what: str,
                    metadata: dict[str, Any] | None = None, flat_keys: Sequence[str] = (),
                    check: bool = True) -> bytes:
    """ONNX bytes of ``module`` (input ``images``, a dynamic batch, ``outputs`` named), metadata attached,
    verified on every batch in ``batches`` (the first is the export's example). Two batch sizes catch a
    graph that baked in the example's batch size."""
    module = module.to("cpu").eval()
    try:
        data = _to_onnx(module, batches[0], outputs)
    except Exception as e:  # noqa: BLE001 - report which part failed, never write a broken file
        raise InsightADError(f"{what}: the graph could not be exported to ONNX "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if metadata is not None:
        data = _with_metadata(data, metadata, flat_keys)
    if check:
        verify(module, data, batches, what)
    return data


def example_batches(shape: Sequence[int], sizes: Sequence[int] = (2, 3), seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random float32 pixel batches (0..255) of (C, H, W) ``shape``, one per batch size."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand((n, *shape), generator=gen) * 255.0 for n in sizes]
