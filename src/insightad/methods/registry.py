"""Methods by name, registered where they are defined (``@register_method("padim")``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from insightad.errors import InsightADError

if TYPE_CHECKING:
    from insightad.methods.base import Detector

D = TypeVar("D", bound="type[Detector]")
_METHODS: dict[str, type[Detector]] = {}


def register_method(name: str) -> Callable[[D], D]:
    """Class decorator: make the Detector subclass available as ``name`` (CLI, model files)."""

    def add(cls: D) -> D:
        if name in _METHODS and _METHODS[name] is not cls:
            raise InsightADError(f"method: {name!r} is already registered by {_METHODS[name].__name__}")
        cls.method = name
        _METHODS[name] = cls
        return cls

    return add


def unregister_method(name: str) -> None:
    """Remove a method (tests that register throw-away methods clean up with this)."""
    _METHODS.pop(name, None)


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> type[Detector]:
    if not isinstance(name, str) or name not in _METHODS:
        shown = repr(name)[:80]
        raise InsightADError(f"method: unknown method {shown} (available: {', '.join(_METHODS)})")
    return _METHODS[name]


def create_detector(name: str, **params: Any) -> Detector:
    """A new, unfitted detector of the named method (unknown settings refused by name)."""
    return get_method(name).from_params(params)
