"""Backbones by name: frozen CNN feature extractors (timm) with weights resolved offline-first.

The registry (names, specs, backbone file metadata) imports no PyTorch, so the runtime install can read it
(``insightad info`` on a backbone file); the feature extractor, which needs PyTorch, is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from insightad.backbones.registry import BACKBONES, BackboneSpec, get_spec

if TYPE_CHECKING:
    from insightad.backbones.extractor import FeatureExtractor, build_extractor

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "build_extractor", "get_spec"]


def __getattr__(name: str) -> Any:
    """``FeatureExtractor`` and ``build_extractor``, from the PyTorch module, when first asked for."""
    if name in ("FeatureExtractor", "build_extractor"):
        from insightad.backbones import extractor

        return getattr(extractor, name)
    raise AttributeError(f"module 'insightad.backbones' has no attribute {name!r}")
