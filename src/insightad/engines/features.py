"""The frozen backbone on the fast engine, for fitting: uint8 images -> feature maps.

Methods whose fit runs a frozen backbone over every training image (baseline, PaDiM, PatchCore)
get their features through ``feature_runner``; on CPU with ONNX Runtime installed that is an
exported (normalise + extractor) graph, exported once per backbone/layers/size and cached, and
checked against PyTorch like any export.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from insightad.engines import resolve_engine
from insightad.errors import InsightADError

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]


class _Features(nn.Module):
    def __init__(self, normalize: nn.Module, extractor: nn.Module) -> None:
        super().__init__()
        self.normalize, self.extractor = normalize, extractor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(self.normalize(x)))


def _digest(module: _Features, shape: tuple[int, ...]) -> str:
    """Identifies the graph: weights, requested levels (same weights can serve other levels) and input shape."""
    ext = module.extractor
    h = hashlib.sha256(repr((shape, getattr(ext, "arch", None), getattr(ext, "layers", None))).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _export(module: _Features, shape: tuple[int, ...]) -> bytes:
    import io

    n_out = len(module.extractor.layers)
    names = [f"f{i}" for i in range(n_out)]
    dummy = torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), buf, input_names=["images"], output_names=names,
                          dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=17, dynamo=False)
    data = buf.getvalue()
    from insightad.engines.onnx_runtime import make_session

    got = make_session(data).run(None, {"images": dummy.numpy()})
    with torch.inference_mode():
        ref = [t.numpy() for t in module(dummy)]
    for a, b in zip(ref, got):
        if float(np.abs(a - b).max()) > 1e-4 * max(float(np.abs(a).max()), 1e-12):
            raise InsightADError("backbone: the ONNX export of the feature extractor disagrees with PyTorch")
    return data


def feature_runner(normalize: nn.Module, extractor: nn.Module, shape: tuple[int, ...], engine: str = "auto",
                   device: torch.device | None = None, threads: int | None = None) -> tuple[FeatureFn, str]:
    """(uint8 batch -> list of float feature maps on ``device``, the engine used)."""
    device = device or torch.device("cpu")
    module = _Features(normalize, extractor).eval()
    chosen = resolve_engine(engine, device.type)
    if chosen == "onnx":
        from insightad.engines.onnx_runtime import cache_dir, make_session
        from insightad.model_file import atomic_write

        target = cache_dir() / f"features-{_digest(module, shape)}.onnx"
        try:
            if target.is_file():
                data = target.read_bytes()
            else:
                data = _export(module, shape)
                try:
                    atomic_write(target, lambda tmp: tmp.write_bytes(data))
                except OSError:
                    pass
            sess = make_session(data, threads)

            def run_onnx(x: torch.Tensor) -> list[torch.Tensor]:
                outs = sess.run(None, {"images": np.ascontiguousarray(x.cpu().numpy())})
                return [torch.from_numpy(o) for o in outs]

            return run_onnx, "onnx"
        except InsightADError:
            if engine == "onnx":
                raise
        except Exception as e:  # noqa: BLE001 - an export failure falls back to PyTorch unless onnx was forced
            if engine == "onnx":
                raise InsightADError(f"backbone: ONNX export failed ({type(e).__name__}: {e})") from None
    module = module.to(device).to(memory_format=torch.channels_last)

    def run_torch(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(module(x.to(device).contiguous(memory_format=torch.channels_last)))

    return run_torch, "torch"
