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

        onnx_det = OnnxDetector.from_file(path, threads)
        warm_up(onnx_det, path)
        return onnx_det
    det = load_model(path, device=device)
    warm_up(det, path)  # on PyTorch first: a model that cannot score is refused before any export
    chosen = resolve_engine(engine, device)
    if engine == "auto" and not det.onnx_auto:
        chosen = "torch"
    det.engine_name_ = "torch"
    if chosen == "onnx":
        from insightad.inference.export import cached_engine

        try:
            det.engine_ = cached_engine(det, path, threads)
            det.engine_name_ = "onnx"
        except InsightADError as e:
            if engine == "onnx":
                raise InsightADError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a graph that cannot be traced: tensors that do not fit
            if engine == "onnx":
                raise InsightADError(f"{path}: cannot export the model to ONNX ({_first_line(e)})") from None
        else:  # the session holds the weights now: a second copy in PyTorch would only cost memory
            det.model_ = None
            gc.collect()
            warm_up(det, path)  # the graph now answers: check it too (PyTorch was checked above)
    return det


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def warm_up(det: Detector, path: str | Path) -> None:
    """Score one generated image at the model's size: a model whose tensors do not fit its metadata,
    or that scores NaN or infinity (NaN in its tensors, a zero std), is refused here, at load."""
    import numpy as np
    import torch

    p = det.preprocessing_
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, p.channels, *p.size), dtype=np.uint8))
    try:
        scores, maps = det.forward_batch(x)
    except InsightADError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the model file's, said in one line
        raise InsightADError(f"{path}: the model cannot score an image (its tensors do not fit its "
                             f"metadata: {_first_line(e)})") from None
    if not bool(torch.isfinite(scores).all()) or (maps is not None and not bool(torch.isfinite(maps).all())):
        raise InsightADError(f"{path}: the model scores NaN or infinity on its warm-up image (NaN or inf in "
                             "its tensors?); refusing it")
