"""A detector backed only by an InsightAD ONNX export: scores like any Detector, no PyTorch weights.

Its method name, maps capability and preprocessing come from the graph's metadata, so it answers
``method``/``has_maps`` per file instead of patching class attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from insightad.config import DetectorParams, params
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError
from insightad.methods.base import Detector


@params
class OnnxDetectorParams(DetectorParams):
    """An exported graph needs only the batching settings of a detector."""


class OnnxDetector(OnnxDetectorParams, Detector):
    """Runs an exported graph on ONNX Runtime (CPU)."""

    Params = OnnxDetectorParams

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> OnnxDetector:
        from insightad.engines.onnx_runtime import OnnxEngine, read_onnx_metadata

        meta = read_onnx_metadata(path)
        det = cls(image_size=int(meta["input_height"]), device="cpu")
        det.onnx_meta_ = meta
        det.preprocessing_ = Preprocessing(size=(meta["input_height"], meta["input_width"]),
                                           channels=meta["channels"], resize=meta["resize"],
                                           mean=tuple(meta["mean"]), std=tuple(meta["std"]))
        details = meta.get("threshold_details") or {}
        det.set_threshold(meta["threshold"], meta.get("threshold_strategy", "onnx-metadata"), **details)
        det.engine_ = OnnxEngine(str(path), threads)
        det.engine_name_ = "onnx"
        det.model_ = None
        det.split_ = None
        det.model_path_ = str(path)
        return det

    onnx_meta_: dict[str, Any]

    @property
    def method(self) -> str:  # type: ignore[override]  # the exported model's method, per file
        return str(self.onnx_meta_["method"])

    @property
    def has_maps(self) -> bool:  # type: ignore[override]  # per file, not per class
        return bool(self.onnx_meta_["has_maps"])

    def _fit(self, images: Any, progress: bool) -> None:
        raise InsightADError("an ONNX export cannot be fitted again; train a model and export it")

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        raise InsightADError("an ONNX export is not a model file")
