"""A scorer backed only by an InsightAD ONNX export: scores like any Detector, no PyTorch anywhere.

Its method name, maps capability, preprocessing and threshold come from the graph's metadata, so it
answers ``method``/``has_maps`` per file instead of patching class attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from insightad.config import DetectorParams, images_per_run, params
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError
from insightad.io import require_file
from insightad.model_schema import validate_onnx_metadata
from insightad.scoring import Scorer


@params
class OnnxDetectorParams(DetectorParams):
    """An exported graph needs only the batching settings of a detector."""


class OnnxDetector(OnnxDetectorParams, Scorer):
    """Runs an exported graph on ONNX Runtime (CPU)."""

    Params = OnnxDetectorParams
    onnx_meta_: dict[str, Any]
    model_: None = None  # no PyTorch model: what a Detector would hold here
    split_: dict[str, Any] | None = None
    metadata_: dict[str, Any]  # the model file's, when the graph was found for one (``inference.load``)

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None, engine: Any = None, arena: bool = True
                  ) -> OnnxDetector:
        """The graph at ``path`` (or ``engine``, a session already made from it) ready to score."""
        from insightad.engines.onnx_runtime import OnnxEngine, check_metadata

        if engine is None:
            require_file(path, "ONNX file")
            try:
                engine = OnnxEngine(str(path), threads, arena)
            except InsightADError:  # e.g. its content checksum does not match: said as it is
                raise
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises several types for a damaged file
                raise InsightADError(f"{path}: not a readable ONNX file "
                                     f"({(str(e).splitlines() or [''])[0][:120]})") from None
        meta = validate_onnx_metadata(check_metadata(engine.session, path), str(path))
        det = cls(image_size=int(meta["input_height"]), device="cpu")
        det.onnx_meta_ = meta
        det.preprocessing_ = Preprocessing(size=(meta["input_height"], meta["input_width"]),
                                           channels=meta["channels"], resize=meta["resize"],
                                           mean=tuple(meta["mean"]), std=tuple(meta["std"]))
        details = meta.get("threshold_details") or {}
        det.set_threshold(meta["threshold"], meta.get("threshold_strategy", "onnx-metadata"), **details)
        det.engine_ = engine
        det.engine_name_ = "onnx"
        det.model_path_ = str(path)
        det.split_ = meta.get("split")  # exports made before it was recorded: None (evaluate says so)
        det.images_per_run_ = images_per_run(meta.get("tiles", 1))  # graphs exported before the key: None
        return det

    @property
    def method(self) -> str:  # type: ignore[override]  # the exported model's method, per file
        return str(self.onnx_meta_["method"])

    @property
    def has_maps(self) -> bool:  # type: ignore[override]  # per file, not per class
        return bool(self.onnx_meta_["has_maps"])

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyper-parameters by name (the batching settings; the method's own are in the graph's metadata)."""
        import dataclasses

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self.Params)}

    def fit(self, *args: Any, **kwargs: Any) -> OnnxDetector:
        raise InsightADError("an ONNX export cannot be fitted again; train a model and export it")
