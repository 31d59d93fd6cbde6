"""Keep PyTorch's compiler stack out of a command-line process until something compiles (nothing here does).

Importing timm (train, export, the PyTorch engine) pulls in torchvision, and both import ``torch._dynamo`` (and
sympy under it) at their own import for two names, and probe for Triton: 150 MB resident and 1.1-1.7 s at
every start, for kernels nothing here compiles. ``without_kernel_compiler`` defers the one and blocks the other.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def without_kernel_compiler() -> None:
    """Keep PyTorch's compiler stack out of this process until something compiles (nothing here does).

    - Triton: importing torchvision probes for it (through torch._dynamo), which maps 75 MB and costs
      0.1-0.3 s at every start. A None entry makes ``import triton`` fail: torch treats it as absent.
    - torch._dynamo (and sympy under it): torchvision and timm import it at their own import for two names,
      ``torch._dynamo.utils.is_compile_supported`` and ``torch._dynamo.disable`` (through
      ``torch.compiler.disable`` decorators), which cost 150 MB resident and 1.1-1.7 s at every start of a
      process that imports timm (train, export, the PyTorch engine). While their modules execute, those two
      names come from stand-ins that import the real torch._dynamo on first call (``_DeferCompiler``).

    For the command line's processes only; a process that already imported them keeps them."""
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]
    if "torch._dynamo" not in sys.modules and not any(isinstance(f, _DeferCompiler) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferCompiler())


DEFERRED_BY = ("timm", "torchvision")  # packages whose import would pull torch._dynamo in for two names


def _real_dynamo() -> Any:
    """The real torch._dynamo, imported now (a stand-in left in ``sys.modules`` is replaced)."""
    import importlib

    for name in ("torch._dynamo.utils", "torch._dynamo"):
        if getattr(sys.modules.get(name), "_insightad_stand_in", False):
            del sys.modules[name]
    return importlib.import_module("torch._dynamo")


def _deferred_disable(fn: Any = None, recursive: bool = True, **kwargs: Any) -> Any:
    """``torch._dynamo.disable`` applied on the first call of the function it decorates (the same function to
    every caller; under ``torch.compile`` the real one is in place by then)."""
    import functools

    def decorate(f: Any) -> Any:
        done: list[Any] = []

        @functools.wraps(f)
        def call(*args: Any, **kw: Any) -> Any:
            if not done:
                done.append(_real_dynamo().disable(f, recursive, **kwargs))
            return done[0](*args, **kw)

        return call

    return decorate(fn) if fn is not None else decorate


def _deferred_is_compile_supported(device_type: Any) -> Any:
    return _real_dynamo().utils.is_compile_supported(device_type)


def _real_attribute(module: str) -> Any:
    """A stand-in's ``__getattr__``: any other name is the real module's (imported now), so a package that asks
    for more of torch._dynamo at import than the two names deferred gets it, at the usual cost."""
    import importlib

    def attribute(name: str) -> Any:
        if name.startswith("__"):  # tools probing modules (__file__, __wrapped__...): not a reason to import it
            raise AttributeError(name)
        _real_dynamo()
        return getattr(importlib.import_module(module), name)

    return attribute


class _StandInLoader:
    """Runs a module of ``DEFERRED_BY`` with torch._dynamo stood in for, then takes the stand-ins away."""

    def __init__(self, loader: Any, finder: _DeferCompiler) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with self.finder.standing_in():
            self.loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # resources, get_data, ...: the real loader's
        return getattr(self.loader, name)


class _DeferCompiler:
    """A meta-path finder: modules of ``DEFERRED_BY`` are found by the finders after it, and run with
    stand-ins for ``torch._dynamo`` and ``torch._dynamo.utils`` that offer the two names they use at import.
    Outside those imports the real torch._dynamo imports as usual; a stand-in is never left behind."""

    def __init__(self) -> None:
        self.depth = 0

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.startswith("torch._dynamo.") and getattr(sys.modules.get("torch._dynamo"), "_insightad_stand_in",
                                                         False):
            import importlib.util

            _real_dynamo()  # a submodule asked for while the stand-in is in place: the real package, then it
            return importlib.util.find_spec(name)
        if name.split(".")[0] not in DEFERRED_BY:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _StandInLoader(spec.loader, self)
                return spec
        return None

    @contextmanager
    def standing_in(self) -> Iterator[None]:
        import types

        import torch

        placed: list[str] = []
        if self.depth == 0 and "torch._dynamo" not in sys.modules:
            package, utils = types.ModuleType("torch._dynamo"), types.ModuleType("torch._dynamo.utils")
            package.__path__ = []  # a package, so that ``torch._dynamo.utils`` resolves to the stand-in below
            package.disable = _deferred_disable  # type: ignore[attr-defined]
            utils.is_compile_supported = _deferred_is_compile_supported  # type: ignore[attr-defined]
            package.__getattr__ = _real_attribute("torch._dynamo")  # type: ignore[method-assign]
            utils.__getattr__ = _real_attribute("torch._dynamo.utils")  # type: ignore[method-assign]
            for m in (package, utils):
                m._insightad_stand_in = True  # type: ignore[attr-defined]
                sys.modules[m.__name__] = m
                placed.append(m.__name__)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            for name in placed:
                if getattr(sys.modules.get(name), "_insightad_stand_in", False):
                    del sys.modules[name]
            if placed and getattr(torch.__dict__.get("_dynamo"), "_insightad_stand_in", False):
                del torch._dynamo  # torch's own lazy attribute imports the real one when asked
