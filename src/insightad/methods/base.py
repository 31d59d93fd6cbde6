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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from insightad import config
from insightad.backbones import build_extractor
from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize
from insightad.data.loader import Batch, ImageSource, iter_batches
from insightad.data.preprocess import Preprocessing
from insightad.decide.normalize import normalize_scores
from insightad.decide.spread import ConstantScoresWarning, constant_scores_message
from insightad.decide.thresholds import FitPolicy, threshold_from_fit
from insightad.errors import InsightADError
from insightad.methods import tiling
from insightad.runtime import resolve_device

ShardRunner = Callable[[str, Sequence[Any]], list[Any]]  # (detector method, images) -> one result per shard
_M = TypeVar("_M", bound=nn.Module)


@dataclass
class Prediction:
    """Scores (raw, one per image), maps at each input's resolution (or None), and decisions."""

    scores: np.ndarray
    maps: list[np.ndarray | None] | None = None  # None for an image that could not be read (strict=False)
    threshold: float | None = None
    labels: np.ndarray | None = None  # True = anomalous, once a threshold is known
    scores_normalized: np.ndarray | None = None  # extra field; never replaces ``scores``
    errors: dict[int, str] = field(default_factory=dict)  # index -> message (non-strict runs; score NaN)
    offset: int = 0  # index of the first image in the whole input (chunks of ``iter_predict``)

    def __len__(self) -> int:
        return len(self.scores)

    def record(self, i: int) -> dict[str, Any]:
        """One image's answer, the same in every machine-readable output (CLI JSON, CSV, HTTP):
        score, score_normalized, threshold, anomalous, error."""
        err = self.errors.get(i)
        score = float(self.scores[i])
        ok = err is None and np.isfinite(score)
        norm = float(self.scores_normalized[i]) if ok and self.scores_normalized is not None else None
        return {"score": score if ok else None, "score_normalized": norm, "threshold": self.threshold,
                "anomalous": bool(self.labels[i]) if ok and self.labels is not None else None,
                "error": err}

    @property
    def anomalous(self) -> np.ndarray | None:
        """The decisions as booleans (True = anomalous): the name every machine-readable output uses."""
        return None if self.labels is None else np.asarray(self.labels, dtype=bool)

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        """Chunks (in order) -> one Prediction over all of them."""
        if not parts:
            return Prediction(np.empty(0))
        maps = None if parts[0].maps is None else [m for p in parts for m in (p.maps or [])]
        cat = (lambda k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts]))
        errors = {p.offset - parts[0].offset + i: e for p in parts for i, e in p.errors.items()}
        return Prediction(np.concatenate([p.scores for p in parts]), maps, parts[0].threshold, cat("labels"),
                          cat("scores_normalized"), errors, parts[0].offset)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


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
    """Base class. A method subclasses its Params dataclass and this class
    (``class PadimDetector(PadimParams, Detector)``), so its constructor is the Params' explicit
    signature, registers with ``@register_method``, and implements ``_fit`` (which sets ``model_`` and
    ``decision_scores_``) and ``_restore``.
    """

    method: ClassVar[str] = ""
    Params: ClassVar[type] = config.DetectorParams
    # Capabilities, declared once here and overridden by a method that differs.
    has_maps: ClassVar[bool] = False  # predict returns per-pixel maps
    uses_backbone: ClassVar[bool] = True  # the model file records a backbone
    onnx_auto: ClassVar[bool] = True  # --engine auto may pick ONNX Runtime for it
    onnx_unsupported: ClassVar[str | None] = None  # why it cannot be exported, if it cannot
    tileable: ClassVar[bool] = False  # can fit and predict on tiles (see methods.tiling)
    sharded_fit: ClassVar[bool] = False  # True: _fit_sharded can spread the per-image work (fit(shards=...))

    # Hyper-parameters every method has (from config.DetectorParams or TrainLoopParams via its Params).
    backbone: str
    weights: str | None
    image_size: int
    batch_size: int
    workers: int
    device: str
    fit_engine: str
    seed: int
    # Learned state (set by fit or by loading a model file).
    model_: nn.Module | None
    engine_: Any
    engine_name_: str
    device_: torch.device
    preprocessing_: Preprocessing
    decision_scores_: np.ndarray
    decision_source_: str
    threshold_: float
    threshold_strategy_: str
    threshold_info_: dict[str, Any]
    split_: dict[str, Any] | None
    n_train_: int | None
    fit_seconds_: float
    fit_engine_: str
    backbone_arch_: str | None
    backbone_source_: str | None
    model_path_: str
    metadata_: dict[str, Any]
    training_: Any
    selection_: dict[str, Any]  # --method auto: the candidates' table and the choice
    validation_: Any  # crossfit.OutOfFold of the last decision (train report only; methods.base cannot import crossfit)

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Params)]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        """A new detector from a dict (config files, model files): unknown keys are refused by name."""
        unknown = sorted(set(params) - set(cls.param_names()))
        if unknown:
            raise InsightADError(f"{cls.method or cls.__name__}: unknown setting {unknown[0]!r} "
                                 f"(known: {', '.join(sorted(cls.param_names()))})")
        return cls(**params)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyper-parameters by name (scikit-learn's contract; none of them is an estimator)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params: Any) -> Detector:
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise InsightADError(f"{self.method}: unknown setting {unknown[0]!r}")
        for k, v in params.items():
            setattr(self, k, v)
        config.validate(self)
        return self

    def __repr__(self) -> str:
        fields = {f.name: f for f in dataclasses.fields(self.Params)}
        changed = {k: v for k, v in self.get_params().items() if v != _default_of(fields[k])}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "model_") or hasattr(self, "engine_")

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
    def fit(self, images: Sequence[ImageSource], progress: bool = False,
            shards: ShardRunner | None = None) -> Detector:
        """Learn what normal looks like from ``images`` (paths, PIL images, arrays or Samples).

        ``shards`` (e.g. Ray tasks, see apps.train_ray) runs the per-image work of methods whose fit
        is a reduction elsewhere: ``shards(name, images)`` calls ``name`` on a copy of this detector
        for contiguous shards of ``images`` and returns the results in order; the fitted model is
        the one a single-process fit gives (within float tolerance)."""
        if len(images) == 0:
            raise InsightADError("fit: no training images given")
        torch.manual_seed(self.seed)
        self.device_ = resolve_device(self.device)
        t0 = time.perf_counter()
        tiled = tiling.is_tiled(self)
        if tiled:  # the method fits on the tiles of the normal images (see methods.tiling)
            tiling.check_tileable(self)
            if shards is not None:
                raise InsightADError(f"{self.method}: a tiled fit runs in one process; train it without --ray")
            self.__dict__.pop("preprocessing_", None)
            images = tiling.training_tiles(self, images)
        if shards is None:
            self._fit(images, progress)
        elif not self.sharded_fit:
            raise InsightADError(f"{self.method}: this method's fit is not a reduction and cannot be distributed; "
                                 "train it without --ray")
        else:
            self._fit_sharded(images, progress, shards)
        if tiled:
            self.model_ = tiling.wrap(self, self._model_as(nn.Module))
        self._finish_fit()
        self.fit_seconds_ = time.perf_counter() - t0
        self.n_train_ = len(images)
        self._warn_if_constant()
        return self

    def _warn_if_constant(self) -> None:
        """Warn when the scores the default threshold was chosen on are (nearly) all equal."""
        scores = getattr(self, "decision_scores_", None)
        message = None if scores is None else constant_scores_message(scores, self.threshold_)
        if message:
            warnings.warn(f"{self.method}: {message}", ConstantScoresWarning, stacklevel=3)

    def _threshold_policy(self) -> FitPolicy:
        """Which scores and which percentile make the default threshold (a method may override)."""
        return FitPolicy(self.decision_source_, float(getattr(self, "threshold_percentile", 99.0)))

    def _finish_fit(self) -> None:
        """The one end-of-fit step: ``decision_scores_`` (normal images scored by a model that did not
        fit on them, where the method can) -> threshold, its strategy and the normalisation scale."""
        if not hasattr(self, "decision_scores_"):  # a method bug, said plainly
            raise InsightADError(f"{self.method}: fit did not leave decision_scores_ for the threshold")
        choice = threshold_from_fit(self.decision_scores_, self._threshold_policy())
        self.set_threshold(choice.value, choice.strategy, **choice.details)

    def _fit(self, images: Sequence[ImageSource], progress: bool) -> None:
        raise NotImplementedError

    def _fit_sharded(self, images: Sequence[ImageSource], progress: bool, shards: ShardRunner) -> None:
        raise NotImplementedError

    def _batches(self, images: Sequence[ImageSource], progress: bool, desc: str, strict: bool = True
                 ) -> Iterable[Batch]:
        original = bool(getattr(getattr(self, "engine_", None), "takes_original", False))
        batches = iter_batches(images, self.preprocessing_, self.batch_size, self.workers, strict=strict,
                               original=original)
        n = (len(images) + self.batch_size - 1) // self.batch_size
        return tqdm(batches, total=n, desc=desc, unit="batch", disable=not progress, leave=False)

    def set_threshold(self, value: float, strategy: str, **details: Any) -> Detector:
        """Record the decision threshold and how it was chosen (kept in the model file)."""
        if not np.isfinite(value):
            raise InsightADError(f"threshold: expected a finite number, got {value!r}")
        self.threshold_ = float(value)
        self.threshold_strategy_ = strategy
        self.threshold_info_ = {k: v for k, v in details.items()}
        return self

    # ------------------------------------------------------------------ predict
    def _model_as(self, kind: type[_M]) -> _M:
        """``model_`` as this method's own module class (absent, None or another class is a bug here)."""
        model = getattr(self, "model_", None)
        if not isinstance(model, kind):
            model = tiling.unwrap(model)  # a tiled model's own method model inside
        if not isinstance(model, kind):
            raise InsightADError(f"{self.method}: no fitted {kind.__name__} in this detector (fit it or load a model file)")
        return model

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise InsightADError(f"{self.method}: the detector is not fitted yet (call fit or load a model file)")

    @torch.inference_mode()
    def forward_batch(self, x: torch.Tensor | list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels (B, C, H, W) at model size, or a list of decoded uint8 (C, H, W) images at their own sizes
        -> (scores (B,), maps (B, H, W) at model size or None)."""
        self._check_fitted()
        engine = getattr(self, "engine_", None)
        if isinstance(x, (list, tuple)) and not getattr(engine, "takes_original", False):
            p = self.preprocessing_
            x = torch.from_numpy(np.stack([p.resize_array(np.asarray(a)) for a in x]))
        if engine is not None:  # e.g. ONNX Runtime: the same images in, the same outputs
            out = engine(x)
        else:
            assert isinstance(x, torch.Tensor)
            dev = getattr(self, "device_", torch.device("cpu"))
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = self._model_as(nn.Module)(x)
        scores = out[0].float()
        maps = out[1].float() if len(out) > 1 else None
        return scores, maps

    def iter_predict(self, images: Sequence[ImageSource] | ImageSource, *, chunk: int = 64, maps: bool = True,
                     strict: bool = True, progress: bool = False, threshold: float | None = None
                     ) -> Iterator[Prediction]:
        """The one prediction loop: Predictions of consecutive chunks of ``images`` (``offset`` says
        where each starts), so memory is bounded by the chunk, not the input. Maps come back at each
        input's own resolution. ``strict=False`` marks unreadable images in ``errors`` (score NaN)."""
        self._check_fitted()
        if not isinstance(images, (list, tuple)):
            images = [images]
        n, chunk = len(images), max(1, int(chunk))
        thr = self.threshold_ if threshold is None else float(threshold)
        want_maps = maps and self.has_maps
        start = 0
        scores: dict[int, float] = {}
        got_maps: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for batch in self._batches(images, progress, "predict", strict=strict):
            errors.update(batch.errors)
            if batch.indices:
                s, m = self.forward_batch(batch.images if batch.decoded is None else batch.decoded)
                values = s.cpu().double().numpy().tolist()
                scores.update(zip(batch.indices, values))
                if want_maps and m is not None:
                    got_maps.update(zip(batch.indices, upsample_maps(m, batch.sizes)))
                for i, v in zip(batch.indices, values):
                    if not np.isfinite(v):  # scored, but not a number: an error for that image, never "normal"
                        errors[i] = non_finite_message(images[i], v)
                        scores[i] = float("nan")
                        if strict:
                            raise InsightADError(errors[i])
            seen = max([*batch.indices, *batch.errors], default=start - 1) + 1
            while start + chunk <= seen:
                yield self._chunk(start, start + chunk, scores, got_maps, errors, thr, want_maps)
                start += chunk
        if start < n:
            yield self._chunk(start, n, scores, got_maps, errors, thr, want_maps)

    def _chunk(self, lo: int, hi: int, scores: dict[int, float], maps: dict[int, np.ndarray],
               errors: dict[int, str], thr: float, want_maps: bool) -> Prediction:
        """Images lo..hi-1 as one Prediction with decisions (popped from the running dicts)."""
        s = np.array([scores.pop(i, np.nan) for i in range(lo, hi)], dtype=np.float64)
        m = [maps.pop(i, None) for i in range(lo, hi)] if want_maps else None
        err = {i - lo: errors.pop(i) for i in range(lo, hi) if i in errors}
        return self.decide(s, m, thr, err, offset=lo)

    def decide(self, scores: np.ndarray, maps: list[np.ndarray | None] | None = None, threshold: float | None = None,
               errors: dict[int, str] | None = None, offset: int = 0) -> Prediction:
        """Raw scores -> a Prediction with decisions and normalised scores: the one place a decision is
        made, whoever scored the images (the prediction loop, the server's micro-batches)."""
        thr = self.threshold_ if threshold is None else float(threshold)
        s = np.asarray(scores, dtype=np.float64)
        labels = np.where(np.isfinite(s), s > thr, False)
        normalized = normalize_scores(s, thr, getattr(self, "threshold_info_", {}).get("scale"))
        return Prediction(s, maps, thr, labels, normalized, errors=dict(errors or {}), offset=offset)

    def predict(self, images: Sequence[ImageSource] | ImageSource, *, maps: bool = True, strict: bool = True,
                progress: bool = False, threshold: float | None = None) -> Prediction:
        """Score images (all at once: ``iter_predict`` bounds memory on large inputs)."""
        n = len(images) if isinstance(images, (list, tuple)) else 1
        return Prediction.concat(list(self.iter_predict(images, chunk=max(1, n), maps=maps, strict=strict,
                                                         progress=progress, threshold=threshold)))

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
