"""Methods by name (torchvision-style registry): each a Detector subclass with its own Params."""

from __future__ import annotations

import importlib
from typing import Any

from insightad.errors import InsightADError
from insightad.methods.base import Detector, Prediction

# name -> "module:Class", imported on first use so one method's dependencies never slow another.
_REGISTRY: dict[str, str] = {
    "baseline": "insightad.methods.baseline:BaselineDetector",
    "svdd": "insightad.methods.svdd:SVDDDetector",
    "autoencoder": "insightad.methods.autoencoder:AutoencoderDetector",
    "padim": "insightad.methods.padim:PadimDetector",
    "patchcore": "insightad.methods.patchcore:PatchCoreDetector",
}

# Methods that train a backbone rather than a detector (their result is a backbone file for
# ``--backbone ssl:PATH``, not a model file): name -> "package.module:Class".
_BACKBONE_TRAINERS: dict[str, str] = {
    "ssl": "insightad.methods.ssl:RotationSSL",
}


def register(name: str, target: str) -> None:
    """Add a method (``target`` = "package.module:Class")."""
    _REGISTRY[name] = target


def available() -> list[str]:
    return list(_REGISTRY)


def get_class(name: str) -> type[Detector]:
    if name not in _REGISTRY:
        raise InsightADError(f"method: unknown method {name!r} (available: {', '.join(_REGISTRY)})")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def backbone_trainers() -> list[str]:
    """Names of the methods that train a backbone (``insightad train --method ssl``)."""
    return list(_BACKBONE_TRAINERS)


def get_backbone_trainer(name: str) -> type:
    if name not in _BACKBONE_TRAINERS:
        raise InsightADError(f"method: unknown backbone trainer {name!r} (available: {', '.join(_BACKBONE_TRAINERS)})")
    module, cls = _BACKBONE_TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def params_class(name: str) -> type:
    """The hyper-parameter dataclass of a detector or backbone trainer, by name."""
    return get_backbone_trainer(name).Params if name in _BACKBONE_TRAINERS else get_class(name).Params


def create_detector(name: str, **params: Any) -> Detector:
    """A new, unfitted detector of the named method."""
    return get_class(name)(**params)


__all__ = ["Detector", "Prediction", "available", "backbone_trainers", "create_detector", "get_backbone_trainer",
           "get_class", "params_class", "register"]
