"""Where a model runs: the device (cpu, cuda) and the engine (PyTorch or ONNX Runtime).

Nothing here imports torch at module level: the scoring path of an exported model never needs it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from insightad.errors import InsightADError

ENGINES = ("auto", "torch", "onnx")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_export_available() -> bool:
    return onnx_available() and importlib.util.find_spec("onnx") is not None and torch_available()


def _on_gpu(device: str) -> bool:
    """Whether ``device`` means a CUDA GPU here (``auto`` does when one is present; no PyTorch: never)."""
    if device.startswith("cuda"):
        return True
    if device != "auto" or not torch_available():
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_engine(name: str, device: str = "cpu") -> str:
    """``auto``: ONNX Runtime on CPU when installed, else PyTorch (always PyTorch on a GPU)."""
    if name not in ENGINES:
        raise InsightADError(f"engine: expected one of {', '.join(ENGINES)}, got {name!r}")
    if name == "auto":
        return "onnx" if onnx_export_available() and not _on_gpu(device) else "torch"
    if name == "onnx" and not onnx_available():
        raise InsightADError("engine: onnx asked for but onnxruntime is not installed "
                             "(pip install 'insightad[onnx]')")
    return name


def resolve_device(device: str) -> Any:
    """'auto' | 'cpu' | 'cuda[:N]' -> a torch.device; cuda without a GPU is an error, not a fallback."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InsightADError(f"device: {device!r} asked for but no CUDA GPU is available (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InsightADError(f"device: expected auto, cpu or cuda, got {device!r}") from None
