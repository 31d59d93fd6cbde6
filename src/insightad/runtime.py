"""Where a model runs: the device (cpu, cuda) and the engine (PyTorch or ONNX Runtime).

Nothing here imports torch at module level: the scoring path of an exported model never needs it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from insightad.errors import InsightADError

ENGINES = ("auto", "torch", "onnx")
TRAIN_EXTRA = "pip install 'insightad[train]'"  # what a runtime-only install lacks for training, export, PyTorch


def _installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a finder that refuses it counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_available() -> bool:
    return _installed("torch")


def onnx_available() -> bool:
    return _installed("onnxruntime")


def onnx_export_available() -> bool:
    return onnx_available() and _installed("onnx") and torch_available()


def require_torch(what: str) -> None:
    """Refuse, in one line naming the extra to install, ``what`` needs PyTorch and it is not installed."""
    if not torch_available():
        raise InsightADError(f"{what} needs PyTorch, which this install does not have: {TRAIN_EXTRA}")


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with its allocator controls (``malloc_trim``, ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand the pages the C heap holds free back to the system (glibc's ``malloc_trim``) before a large
    allocation: after a fit the heap keeps hundreds of MB of freed temporaries, which would otherwise sit
    under the next phase's peak. Not done per temporary (fresh pages each time cost 45% of a fit's speed);
    nothing where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
SERVE_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value
TRAIN_MMAP_THRESHOLD = 16 << 20
TRAIN_TRIM_THRESHOLD = 64 << 20


def pin_mmap_threshold(nbytes: int = SERVE_MMAP_THRESHOLD, trim: int | None = None) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process: every C-heap block that large gets its own
    mapping, handed back to the system when freed. By default each such free raises the threshold to the
    block's size (up to 32 MB), after which those buffers come from the heap arenas, where fragmentation keeps
    freed memory resident. A fixed threshold also fixes the heap's trim threshold (free memory at the heap's
    top beyond which it is handed back) at 128 kB unless ``trim`` sets it.

    - ``serve``, 128 kB: after the first decoded image (~2.4 MB for 900x900 RGB) every image buffer and
      activation came from the heap; under a load test RSS crept up ~10% in five minutes and stayed there.
    - ``train``, 16 MB and trim 64 MB: a fit's 16-32 MB temporaries (feature batches, distance blocks) stayed
      resident under the next phase. PatchCore's train on bottle: 1.64-1.69 GB -> 1.25 GB at the same speed;
      PaDiM's a few tens of MB lower (docs/benchmarks.md). With trim at 128 kB both go lower (PatchCore 1.20 GB,
      PaDiM 1.46-1.51 GB) but 8-30% slower: the heap is handed back and faulted in again at every large free.

    False where not applicable: not Linux glibc, or the user set ``MALLOC_MMAP_THRESHOLD_``, which glibc obeys."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if trim is not None and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, int(trim))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


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


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is visible, without importing PyTorch (a machine without one needs no check)."""
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl") or bool(shutil.which("nvidia-smi"))


def on_gpu(device: str) -> bool:
    """Whether ``device`` means a CUDA GPU here (``auto`` does when one is present; no PyTorch: never).
    PyTorch is imported only where an NVIDIA driver is present (then it will run the model anyway)."""
    if device.startswith("cuda"):
        return True
    if device != "auto" or not torch_available() or not nvidia_driver_present():
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_engine(name: str, device: str = "cpu") -> str:
    """``auto``: ONNX Runtime on CPU when installed, else PyTorch (always PyTorch on a GPU)."""
    if name not in ENGINES:
        raise InsightADError(f"engine: expected one of {', '.join(ENGINES)}, got {name!r}")
    if name == "auto":
        return "onnx" if onnx_export_available() and not on_gpu(device) else "torch"
    if name == "onnx" and not onnx_available():
        raise InsightADError("engine: onnx asked for but onnxruntime is not installed "
                             "(onnxruntime is part of the base install: pip install insightad)")
    return name


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(device: str) -> str:
    """``device`` spelt as one this package runs on ('auto', 'cpu', 'cuda' or 'cuda:N'), checked without PyTorch:
    an engine that ignores the device (ONNX Runtime on the CPU) must not accept a typo that another refuses."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise InsightADError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def resolve_device(device: str) -> Any:
    """'auto' | 'cpu' | 'cuda[:N]' -> a torch.device; cuda without a GPU is an error, not a fallback."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InsightADError(f"device: {device!r} asked for but no CUDA GPU is available (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InsightADError(f"device: expected auto, cpu or cuda, got {device!r}") from None
