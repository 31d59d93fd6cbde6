"""The Detector contract every method follows, and the Prediction every method returns.

scikit-learn conventions: the constructor stores hyper-parameters only, ``fit`` returns self,
learned state ends in ``_``. Higher score = more anomalous, everywhere. Each method's maths lives
in a pure-tensor ``nn.Module`` (``model_``: uint8 images -> scores [, maps at model size]); the
Detector around it handles data, batching, devices, thresholds and persistence once for all.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from insightad import config
from insightad.backbones import build_extractor
from insightad.backbones.extractor import FeatureExtractor
from insightad.data.loader import Batch, ImageSource, iter_batches
from insightad.data.preprocess import Normalize, Preprocessing
from insightad.decide.normalize import normalize_scores
from insightad.decide.spread import ConstantScoresWarning, constant_scores_message
from insightad.errors import InsightADError


@dataclass
class Prediction:
    """Scores (raw, one per image), maps at each input's resolution (or None), and decisions."""

    scores: np.ndarray
    maps: list[np.ndarray] | None = None
    threshold: float | None = None
    labels: np.ndarray | None = None  # True = anomalous, once a threshold is known
    scores_normalized: np.ndarray | None = None  # extra field; never replaces ``scores``
    errors: dict[int, str] = field(default_factory=dict)  # index -> message (non-strict runs; score NaN)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def anomalous(self) -> np.ndarray | None:
        """The decisions as booleans (True = anomalous): the name every machine-readable output uses."""
        return None if self.labels is None else np.asarray(self.labels, dtype=bool)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InsightADError(f"device: {device!r} asked for but no CUDA GPU is available (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InsightADError(f"device: expected auto, cpu or cuda, got {device!r}") from None


def non_finite_message(source: Any, score: float) -> str:
    """One line for an image the model scored NaN or infinity (a model fault, not a verdict)."""
    source = getattr(source, "path", source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    return f"{name}: the model's score is {score} (not a finite number); no verdict for this image"


def upsample_maps(maps: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Maps at model size (B, h, w) -> one float32 array per image at its own (H, W)."""
    out = []
    for m, (h, w) in zip(maps, sizes):
        m = m[None, None].float()
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m[0, 0].cpu().numpy())
    return out


class Detector:
    """Base class: subclasses set ``method``, ``Params`` and implement ``_fit`` and ``_restore``."""

    method: ClassVar[str] = ""
    Params: ClassVar[type] = config.DetectorParams
    has_maps: ClassVar[bool] = False
    uses_backbone: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        p = config.build(self.Params, params, where=self.method or type(self).__name__)
        for f in dataclasses.fields(p):
            setattr(self, f.name, getattr(p, f.name))

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self.Params)}

    def set_params(self, **params: Any) -> "Detector":
        merged = {**self.get_params(), **params}
        p = config.build(self.Params, merged, where=self.method)
        for f in dataclasses.fields(p):
            setattr(self, f.name, getattr(p, f.name))
        return self

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items()
                   if v != self.Params.__dataclass_fields__[k].default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "model_")

    # ------------------------------------------------------------------ backbone
    def feature_layers(self) -> list[int]:
        """Backbone levels this method reads (subclasses override)."""
        return list(getattr(self, "layers", [1, 2, 3]))

    def _make_extractor(self, pretrained: bool = True) -> FeatureExtractor:
        # Restoring from a model file needs the architecture only (an ssl: file may be gone by then).
        name = self.backbone if pretrained else (getattr(self, "backbone_arch_", None) or self.backbone)
        extractor, spec, source = build_extractor(name, self.feature_layers(), self.weights,
                                                  pretrained=pretrained)
        self.backbone_arch_ = spec.arch
        if pretrained:
            self.backbone_source_ = source
        if not hasattr(self, "preprocessing_"):
            self.preprocessing_ = Preprocessing(size=(self.image_size, self.image_size), channels=3,
                                                mean=tuple(spec.mean), std=tuple(spec.std))
        return extractor

    def _feature_runner(self, extractor: FeatureExtractor):
        """uint8 batch -> backbone features on the fast engine (see engines.features)."""
        from insightad.engines.features import feature_runner

        p = self.preprocessing_
        fn, self.fit_engine_ = feature_runner(self._normalize(), extractor, (p.channels, *p.size),
                                              self.fit_engine, self.device_)
        return fn

    def _normalize(self) -> Normalize:
        p = self.preprocessing_
        return Normalize(p.mean, p.std, p.channels)

    # ------------------------------------------------------------------ fit
    def fit(self, images: Sequence[ImageSource], progress: bool = False) -> "Detector":
        """Learn what normal looks like from ``images`` (paths, PIL images, arrays or Samples)."""
        if len(images) == 0:
            raise InsightADError("fit: no training images given")
        torch.manual_seed(self.seed)
        self.device_ = resolve_device(self.device)
        t0 = time.perf_counter()
        self._fit(images, progress)
        self.fit_seconds_ = time.perf_counter() - t0
        self.n_train_ = len(images)
        if not hasattr(self, "threshold_"):
            raise InsightADError(f"{self.method}: fit did not set a default threshold")  # a method bug, said plainly
        self._warn_if_constant()
        return self

    def _warn_if_constant(self) -> None:
        """Warn when the scores the default threshold was chosen on are (nearly) all equal."""
        scores = getattr(self, "decision_scores_", None)
        if scores is None:
            scores = getattr(self, "train_scores_", None)
        message = None if scores is None else constant_scores_message(scores, self.threshold_)
        if message:
            warnings.warn(f"{self.method}: {message}", ConstantScoresWarning, stacklevel=3)

    def _fit(self, images: Sequence[ImageSource], progress: bool) -> None:
        raise NotImplementedError

    def _batches(self, images: Sequence[ImageSource], progress: bool, desc: str, strict: bool = True
                 ) -> Iterable[Batch]:
        batches = iter_batches(images, self.preprocessing_, self.batch_size, self.workers, strict=strict)
        n = (len(images) + self.batch_size - 1) // self.batch_size
        return tqdm(batches, total=n, desc=desc, unit="batch", disable=not progress, leave=False)

    def set_threshold(self, value: float, strategy: str, **details: Any) -> "Detector":
        """Record the decision threshold and how it was chosen (kept in the model file)."""
        if not np.isfinite(value):
            raise InsightADError(f"threshold: expected a finite number, got {value!r}")
        self.threshold_ = float(value)
        self.threshold_strategy_ = strategy
        self.threshold_info_ = {k: v for k, v in details.items()}
        return self

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise InsightADError(f"{self.method}: the detector is not fitted yet (call fit or load a model file)")

    @torch.inference_mode()
    def forward_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, C, H, W) at model size -> (scores (B,), maps (B, H, W) at model size or None)."""
        self._check_fitted()
        engine = getattr(self, "engine_", None)
        if engine is not None:  # e.g. ONNX Runtime: same inputs, same outputs
            out = engine(x)
        else:
            dev = getattr(self, "device_", torch.device("cpu"))
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = self.model_(x)
        scores = out[0].float()
        maps = out[1].float() if len(out) > 1 else None
        return scores, maps

    def predict(self, images: Sequence[ImageSource] | ImageSource, *, maps: bool = True, strict: bool = True,
                progress: bool = False, threshold: float | None = None) -> Prediction:
        """Score images; maps come back at each input's own resolution. ``strict=False`` marks
        unreadable images in ``errors`` (score NaN) instead of raising."""
        self._check_fitted()
        if not isinstance(images, (list, tuple)):
            images = [images]
        n = len(images)
        scores = np.full(n, np.nan, dtype=np.float64)
        all_maps: list[np.ndarray | None] | None = [None] * n if (maps and self.has_maps) else None
        errors: dict[int, str] = {}
        for batch in self._batches(images, progress, "predict", strict=strict):
            errors.update(batch.errors)
            if not batch.indices:
                continue
            s, m = self.forward_batch(batch.images)
            scores[batch.indices] = s.cpu().double().numpy()
            if all_maps is not None and m is not None:
                for i, arr in zip(batch.indices, upsample_maps(m, batch.sizes)):
                    all_maps[i] = arr
        for i in np.flatnonzero(~np.isfinite(scores)):
            if int(i) not in errors:  # scored, but not a number: an error for that image, never "normal"
                errors[int(i)] = non_finite_message(images[int(i)], scores[i])
                scores[i] = np.nan
                if strict:
                    raise InsightADError(errors[int(i)])
        thr = self.threshold_ if threshold is None else float(threshold)
        labels = np.where(np.isnan(scores), False, scores > thr)
        normalized = normalize_scores(scores, thr, getattr(self, "threshold_info_", {}).get("scale"))
        return Prediction(scores, all_maps, thr, labels, normalized, errors=errors)

    def anomaly_score(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Raw scores only (higher = more anomalous)."""
        return self.predict(images, maps=False).scores

    # ------------------------------------------------------------------ persistence hooks
    def state_metadata(self) -> dict[str, Any]:
        """Method-specific JSON state needed to rebuild ``model_`` (shapes come from the tensors)."""
        return {}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        """An empty ``model_`` of the right shapes, ready for a strict ``load_state_dict``."""
        raise NotImplementedError
