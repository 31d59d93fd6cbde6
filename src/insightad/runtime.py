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
M_ARENA_MAX = -8
SERVE_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value
TRAIN_MMAP_THRESHOLD = 16 << 20
TRAIN_TRIM_THRESHOLD = 64 << 20
TRAIN_ARENAS = 2


def pin_mmap_threshold(nbytes: int = SERVE_MMAP_THRESHOLD, trim: int | None = None, arenas: int | None = None
                       ) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process: every C-heap block that large gets its own
    mapping, handed back to the system when freed. By default each such free raises the threshold to the
    block's size (up to 32 MB), after which those buffers come from the heap arenas, where fragmentation keeps
    freed memory resident. A fixed threshold also fixes the heap's trim threshold (free memory at the heap's
    top beyond which it is handed back) at 128 kB unless ``trim`` sets it.

    - ``serve``, 128 kB: after the first decoded image (~2.4 MB for 900x900 RGB) every image buffer and
      activation came from the heap; under a load test RSS crept up ~10% in five minutes and stayed there.
    - ``train``, 16 MB, trim 64 MB and 2 heap arenas: a fit's 16-32 MB temporaries (feature batches, distance
      blocks) stayed resident under the next phase. PatchCore's train on bottle: 1.64-1.69 GB -> 1.25 GB at the
      same speed. Two arenas instead of glibc's 8 per core (the image decoding threads' blocks kept in arenas of
      their own): PaDiM's train on bottle 1204-1221 -> 1185-1186 MB (docs/benchmarks.md). With trim at 128 kB or
      the threshold at 4 MB both go lower but 8-30% slower: memory is handed back and faulted in again at every
      large free (ONNX Runtime's activations are 4-16 MB).

    ``arenas`` caps glibc's heap arenas (by default 8 per core, one for each thread that allocates). False where
    not applicable: not Linux glibc, or the user set ``MALLOC_MMAP_THRESHOLD_``, which glibc obeys."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if trim is not None and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, int(trim))
    if arenas is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, int(arenas))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def available_memory() -> int | None:
    """Bytes the kernel says new work could still use without swapping (``MemAvailable``); None where
    ``/proc/meminfo`` does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


THP_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's own switch (c10's CPU allocator), read once per process


def huge_pages_for_tensors() -> bool:
    """Have PyTorch back its CPU tensors of 2 MB and more with transparent huge pages, for a backbone's
    fine-tuning. Its activations (up to 230 MB per tensor at 256 px, batch 32 x 3) are each a fresh mapping,
    faulted in 4 kB page by page at every step: one CutPaste epoch on crack made 68-70 million page faults and
    the kernel's share of its CPU time was over half; with huge pages 1.7-1.8 million, 95-103 s instead of
    144-146 s, peak 5.1 instead of 5.5 GB (docs/ssl.md). Only before PyTorch is imported (it reads the switch
    once), and never over the user's own setting; the kernel decides in the end
    (``/sys/kernel/mm/transparent_hugepage``). True when set here."""
    if "torch" in sys.modules or THP_ENV in os.environ or not sys.platform.startswith("linux"):
        return False
    os.environ[THP_ENV] = "1"
    return True


THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_missed() -> bool:
    """Whether a CPU fine-tune in this process runs without the huge pages it could have had: on Linux, the
    kernel offers them (``madvise`` or ``always``) but ``THP_MEM_ALLOC_ENABLE`` is not set at all (``insightad
    train`` sets it before PyTorch is imported; a Python program must itself; a user's 0 is a choice, not missed)."""
    if not sys.platform.startswith("linux") or THP_ENV in os.environ:  # set: by train, or by the user's choice
        return False
    try:
        with open(THP_MODE_FILE, encoding="ascii") as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


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
