"""Engines that run a trained model: PyTorch (the reference) and ONNX Runtime (fast on CPU).

Both take the same uint8 images resized by the model's own preprocessing and return the same
scores (within 1e-4 relative) and maps; the ONNX graph includes normalisation.
"""

from __future__ import annotations

import importlib.util

ENGINES = ("auto", "torch", "onnx")


def onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _on_gpu(device: str) -> bool:
    """Whether ``device`` means a CUDA GPU here (``auto`` does when one is present; no PyTorch: never)."""
    if device.startswith("cuda"):
        return True
    if device != "auto" or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_engine(name: str, device: str = "cpu") -> str:
    """``auto``: ONNX Runtime on CPU when installed, else PyTorch (always PyTorch on a GPU)."""
    from insightad.errors import InsightADError

    if name not in ENGINES:
        raise InsightADError(f"engine: expected one of {', '.join(ENGINES)}, got {name!r}")
    if name == "auto":
        return "onnx" if onnx_available() and not _on_gpu(device) else "torch"
    if name == "onnx" and not onnx_available():
        raise InsightADError("engine: onnx asked for but onnxruntime is not installed "
                             "(pip install 'insightad[onnx]')")
    return name
