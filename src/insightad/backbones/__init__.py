"""Backbones by name: frozen CNN feature extractors (timm) with weights resolved offline-first."""

from insightad.backbones.extractor import FeatureExtractor, build_extractor
from insightad.backbones.registry import BACKBONES, BackboneSpec, get_spec

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "build_extractor", "get_spec"]
