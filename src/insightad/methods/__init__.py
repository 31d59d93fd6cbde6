"""Detectors: the base contract, the registry, one module per method, shared components.

Importing this package registers the built-in methods (each module registers itself with
``@register_method`` at its definition).
"""

from __future__ import annotations

from insightad.methods import autoencoder, baseline, ensemble, padim, patchcore, svdd  # noqa: E402,F401  (registration)
from insightad.methods.base import Detector, Prediction
from insightad.methods.registry import create_detector, get_method, list_methods, register_method, unregister_method

__all__ = ["Detector", "Prediction", "create_detector", "get_method", "list_methods", "register_method",
           "unregister_method"]
