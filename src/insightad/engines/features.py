"""The frozen backbone on the fast engine, for fitting: float pixels (0..255) at model size -> feature maps.

Methods whose fit runs a frozen backbone over every training image (baseline, PaDiM, PatchCore)
get their features through ``feature_runner``; on CPU with ONNX Runtime installed that is an
exported (normalise + extractor) graph, exported once per backbone/layers/size and cached, and
checked against PyTorch like any export.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from insightad.errors import InsightADError
from insightad.runtime import resolve_engine

if TYPE_CHECKING:
    from insightad.backbones.extractor import FeatureExtractor

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]
# Images per ONNX Runtime call: the backbone's activations for a whole fit batch (32 at 256 px) at once
# are not faster than 8 at a time and cost memory (PaDiM's fit of bottle: peak 1672 -> 1586 MB); 2 at a time
# are as fast again or faster (lite0 at 256 px, 2 threads: 44-50 vs 34-37 images/s on a loaded machine) and
# the session's activations add nothing measurable to the process's peak, against +96 MB for 8.
ONNX_CHUNK = 2


class _Features(nn.Module):
    def __init__(self, normalize: nn.Module, extractor: nn.Module) -> None:
        super().__init__()
        self.normalize, self.extractor = normalize, extractor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(self.normalize(x)))


def _digest(module: _Features, shape: tuple[int, ...]) -> str:
    """Identifies the graph: weights, requested levels (same weights can serve other levels) and input shape."""
    ext = module.extractor
    h = hashlib.sha256(repr((shape, "float32", getattr(ext, "arch", None), getattr(ext, "layers", None))).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _export(module: _Features, shape: tuple[int, ...], target: Path) -> Path:
    from insightad.engines.export import example_batches, export_verified

    names = [f"f{i}" for i in range(len(cast("FeatureExtractor", module.extractor).layers))]
    return export_verified(module, example_batches(shape, (2,)), names, "backbone", target)


def feature_runner(normalize: nn.Module, extractor: nn.Module, shape: tuple[int, ...], engine: str = "auto",
                   device: torch.device | None = None, threads: int | None = None) -> tuple[FeatureFn, str]:
    """(float pixel batch -> list of float feature maps on ``device``, the engine used)."""
    device = device or torch.device("cpu")
    module = _Features(normalize, extractor).eval()
    chosen = resolve_engine(engine, device.type)
    if chosen == "onnx":
        from insightad.engines.cache import cache_dir, touch
        from insightad.engines.onnx_runtime import make_session

        target = cache_dir() / f"features-{_digest(module, shape)}.onnx"
        try:
            if not target.is_file():
                try:
                    _export(module, shape, target)
                except OSError:  # a read-only cache: export into a temporary folder, read it once
                    with tempfile.TemporaryDirectory() as tmp:
                        graph = _export(module, shape, Path(tmp) / "features.onnx")
                        sess = make_session(str(graph), threads, arena=False)
            if target.is_file():
                sess = make_session(str(target), threads, arena=False)
                touch(target)  # last use: pruning evicts the least recently used graphs first

            def run_onnx(x: torch.Tensor) -> list[torch.Tensor]:
                arr = x.cpu().numpy()

                def run(part: np.ndarray) -> list[np.ndarray]:
                    return sess.run(None, {"images": np.ascontiguousarray(part, dtype=np.float32)})

                if len(arr) <= ONNX_CHUNK:
                    return [torch.from_numpy(o) for o in run(arr)]
                # Each chunk is copied into place as it comes: never all chunks and their concatenation at once.
                first = run(arr[:ONNX_CHUNK])
                out = [np.empty((len(arr), *o.shape[1:]), dtype=o.dtype) for o in first]
                for a in range(0, len(arr), ONNX_CHUNK):
                    for level, o in zip(out, first if a == 0 else run(arr[a:a + ONNX_CHUNK])):
                        level[a:a + len(o)] = o
                return [torch.from_numpy(o) for o in out]

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
