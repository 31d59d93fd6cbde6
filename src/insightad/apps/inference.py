"""Load a model for inference on the chosen engine: one entry point for predict, evaluate, sort, serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from insightad.data.preprocess import Preprocessing
from insightad.engines import resolve_engine
from insightad.errors import InsightADError
from insightad.methods.base import Detector


class ExportedDetector(Detector):
    """A detector backed only by an InsightAD ONNX export (no PyTorch weights)."""

    method = "onnx-export"

    def _restore(self, tensors, state):  # pragma: no cover - never built from a model file
        raise InsightADError("an ONNX export is not a model file")


def load_onnx_file(path: str | Path, threads: int | None = None) -> Detector:
    from insightad.engines.onnx_runtime import OnnxEngine, read_onnx_metadata

    meta = read_onnx_metadata(path)
    det = ExportedDetector(image_size=meta["input_height"], device="cpu")
    det.method = meta["method"]
    det.has_maps = bool(meta["has_maps"])
    det.backbone = meta.get("backbone", "")
    det.preprocessing_ = Preprocessing(size=(meta["input_height"], meta["input_width"]), channels=meta["channels"],
                                       resize=meta["resize"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    det.set_threshold(meta["threshold"], meta.get("threshold_strategy", "onnx-metadata"))
    det.engine_ = OnnxEngine(str(path), threads)
    det.engine_name_ = "onnx"
    det.model_ = None
    det.split_ = None
    return det


def load_for_inference(path: str | Path, engine: str = "auto", threads: int | None = None,
                       device: str = "cpu") -> Detector:
    """A model file (or an InsightAD ONNX export) ready to predict on ``engine``.

    ``auto`` picks ONNX Runtime on CPU when installed (exported once per model file and cached),
    falling back to PyTorch for a method whose graph cannot be exported.
    """
    from insightad.model_file import load_model

    if threads:
        torch.set_num_threads(int(threads))
    if str(path).lower().endswith(".onnx"):
        if engine == "torch":
            raise InsightADError(f"{path}: an ONNX file runs on the onnx engine only (drop --engine torch)")
        onnx_det = load_onnx_file(path, threads)
        warm_up(onnx_det, path)
        return onnx_det
    det = load_model(path, device=device)
    warm_up(det, path)  # on PyTorch first: a model that cannot score is refused before any export
    chosen = resolve_engine(engine, device)
    if engine == "auto" and not getattr(det.model_, "onnx_auto", True):
        chosen = "torch"  # the method says its PyTorch graph is the better default (see its model)
    det.engine_name_ = "torch"
    if chosen == "onnx":
        from insightad.engines.onnx_runtime import cached_engine

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
            import gc

            gc.collect()
    warm_up(det, path)
    return det


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def warm_up(det: Detector, path: str | Path) -> None:
    """Score one generated image at the model's size: a model whose tensors do not fit its metadata,
    or that scores NaN or infinity (NaN in its tensors, a zero std), is refused here, at load."""
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
