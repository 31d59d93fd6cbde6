"""The Detector contract every method follows (the Prediction it returns is ``scoring.Prediction``).

scikit-learn conventions: the constructor stores hyper-parameters only, ``fit`` returns self,
learned state ends in ``_``. Higher score = more anomalous, everywhere. Each method's maths lives
in a pure-tensor ``nn.Module`` (``model_``: images at model size -> scores [, maps at model size]); the
Detector around it handles data, batching, devices and persistence once for all, and scores through
the one prediction loop of ``scoring.Scorer`` (numpy in, numpy out; PyTorch runs only in ``_run``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from insightad import config
from insightad.backbones import build_extractor
from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize
from insightad.data.loader import ImageSource
from insightad.data.preprocess import Preprocessing
from insightad.decide.spread import ConstantScoresWarning, constant_scores_message
from insightad.decide.thresholds import FitPolicy, threshold_from_fit
from insightad.errors import InsightADError
from insightad.methods import tiling
from insightad.runtime import resolve_device
from insightad.scoring import Prediction, Scorer  # noqa: F401 - Prediction re-exported (methods' public API)
from insightad.scoring.scorer import upsample_maps  # noqa: F401 - re-exported

ShardRunner = Callable[[str, Sequence[Any]], list[Any]]  # (detector method, images) -> one result per shard
_M = TypeVar("_M", bound=nn.Module)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


@dataclass
class TensorBatch:
    """A batch for fitting: images (B, C, H, W) at model size as one tensor, their sizes, indices, errors."""

    images: torch.Tensor
    sizes: list[tuple[int, int]]
    indices: list[int]
    errors: dict[int, str]


class Detector(Scorer):
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
        """uint8 batch -> backbone features on the fast engine (see engines.features); the engine is recorded
        as the fit's."""
        fn, self.fit_engine_ = self._backbone_runner(extractor)
        return fn

    def _backbone_runner(self, extractor: FeatureExtractor):
        """(uint8 batch at model size -> backbone features on ``fit_engine``, the engine used)."""
        from insightad.engines.features import feature_runner

        p = self.preprocessing_
        return feature_runner(self._normalize(), extractor, (p.channels, *p.size), self.fit_engine, self.device_)

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

    def _batches(self, images: Sequence[ImageSource], progress: bool, desc: str, strict: bool = True,
                 batch_size: int | None = None) -> Iterator[TensorBatch]:
        """Images at model size as tensors, for fitting (the prediction loop reads ``_input_batches``)."""
        for b in self._input_batches(images, progress, desc, strict, batch_size):
            x = torch.from_numpy(b.stacked()) if b.images else torch.empty(0, dtype=torch.float32)
            yield TensorBatch(x, b.sizes, b.indices, b.errors)

    # ------------------------------------------------------------------ predict
    def _model_as(self, kind: type[_M]) -> _M:
        """``model_`` as this method's own module class (absent, None or another class is a bug here)."""
        model = getattr(self, "model_", None)
        if not isinstance(model, kind):
            model = tiling.unwrap(model)  # a tiled model's own method model inside
        if not isinstance(model, kind):
            raise InsightADError(f"{self.method}: no fitted {kind.__name__} in this detector (fit it or load a model file)")
        return model

    def _run(self, x: np.ndarray) -> Sequence[Any]:
        """The PyTorch model on a numpy batch (or the engine that replaced it: ONNX Runtime)."""
        if getattr(self, "engine_", None) is not None:
            return super()._run(x)
        return tuple(o.float().cpu().numpy() for o in self.forward_tensor(torch.from_numpy(np.ascontiguousarray(x))))

    @torch.inference_mode()
    def forward_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The PyTorch model on a batch at model size (on its device): (scores (B,), maps (B, h, w)...)."""
        dev = getattr(self, "device_", torch.device("cpu"))
        x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return tuple(self._model_as(nn.Module)(x))

    # ------------------------------------------------------------------ persistence hooks
    def state_metadata(self) -> dict[str, Any]:
        """Method-specific JSON state needed to rebuild ``model_`` (shapes come from the tensors)."""
        return {}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        """An empty ``model_`` of the right shapes, ready for a strict ``load_state_dict``."""
        raise NotImplementedError
