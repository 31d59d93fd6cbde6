"""Methods by name (torchvision-style registry): each a Detector subclass with its own Params."""

from __future__ import annotations

import importlib
from typing import Any

from insightad.errors import InsightADError
from insightad.methods.base import Detector, Prediction

# name -> "module:Class", imported on first use so one method's dependencies never slow another.
_REGISTRY: dict[str, str] = {
    "baseline": "insightad.methods.baseline:BaselineDetector",
    "padim": "insightad.methods.padim:PadimDetector",
    "patchcore": "insightad.methods.patchcore:PatchCoreDetector",
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


def create_detector(name: str, **params: Any) -> Detector:
    """A new, unfitted detector of the named method."""
    return get_class(name)(**params)


__all__ = ["Detector", "Prediction", "available", "create_detector", "get_class", "register"]
