"""Load a model for inference on the chosen engine: one entry point for predict, evaluate, sort, serve."""

from __future__ import annotations

import gc
from pathlib import Path

from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.runtime import resolve_engine


def load_for_inference(path: str | Path, engine: str = "auto", threads: int | None = None,
                       device: str = "cpu") -> Detector:
    """A model file (or an InsightAD ONNX export) ready to predict on ``engine``.

    ``auto`` picks ONNX Runtime on CPU when installed (exported once per model file and cached),
    except for a method that declares its PyTorch graph the better default (``onnx_auto = False``).
    """
    import torch

    from insightad.model_file import load_model

    if threads:
        torch.set_num_threads(int(threads))
    if str(path).lower().endswith(".onnx"):
        if engine == "torch":
            raise InsightADError(f"{path}: an ONNX file runs on the onnx engine only (drop --engine torch)")
        from insightad.inference.onnx_detector import OnnxDetector

        return OnnxDetector.from_file(path, threads)
    det = load_model(path, device=device)
    chosen = resolve_engine(engine, device)
    if engine == "auto" and not det.onnx_auto:
        chosen = "torch"
    det.engine_name_ = "torch"
    if chosen == "onnx":
        from insightad.engines.onnx_runtime import OnnxEngine
        from insightad.inference.export import cached_export

        try:
            det.engine_ = OnnxEngine(cached_export(det, path), threads)
            det.engine_name_ = "onnx"
        except InsightADError:
            if engine == "onnx":
                raise
        else:  # the session holds the weights now: a second copy in PyTorch would only cost memory
            det.model_ = None
            gc.collect()
    return det
