"""The graph cache of this machine: exported graphs by model hash, and session-ready copies of graphs.

A portable graph is one ``.onnx`` file with its constants inside. Opening it costs ONNX Runtime a
parse of every constant (a copy) and its graph optimisation: 0.8 s and twice the constants in peak
memory for a 240 MB PaDiM graph, on every process start. Its *ready copy* is the same graph already
optimised (``ORT_ENABLE_EXTENDED``: the fusions that do not depend on the CPU) with the constants in a
file beside it, which ONNX Runtime maps into memory instead of copying: it opens in about 0.01 s and
the pages are shared with the page cache. Ready copies are derived data, kept under the cache folder
(never beside the user's files), keyed by the source file's identity (device, inode, size, modification
time: a file renamed into place keeps its copy, a file rewritten or replaced gets a new one) and the
ONNX Runtime version; made once per graph, atomically (a folder renamed into place),
so two processes never see half of one. Where the cache cannot be written, graphs open the slow way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from insightad.engines.checksum import check_content
from insightad.runtime import release_free_memory

CACHE_LIMIT_BYTES = 2 * 1024**3
READY = "ready"  # cache_dir() / READY / <key> / {graph.onnx, graph.data}
READY_GRAPH, READY_DATA = "graph.onnx", "graph.data"
DIGESTS = "digests"  # cache_dir() / DIGESTS / <identity key>: the sha256 of a model file, as text
RACY_SECONDS = 2.0  # a file modified this recently may change again within its timestamp: always hashed
READY_MIN_BYTES = 4096  # constants at least this large go to the mapped data file
STALE_BUILD_SECONDS = 3600.0  # a half-built ready copy older than this belongs to no live process


def cache_dir() -> Path:
    base = os.environ.get("INSIGHTAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "insightad")
    return Path(base) / "onnx"


def touch(path: Path) -> None:
    """Mark a cache entry as just used (pruning removes the least recently used first); a read-only cache
    keeps its times."""
    try:
        os.utime(path)
    except OSError:
        pass


def _entries() -> list[tuple[Path, int, float]]:
    """(path, bytes, last use) of every cache entry: exported graphs and ready-copy folders."""
    root = cache_dir()
    out = [(f, f.stat().st_size, f.stat().st_mtime) for f in root.glob("*.onnx")]
    for d in (root / READY).glob("*"):
        if d.is_dir() and not d.name.startswith("."):
            files = [f for f in d.iterdir() if f.is_file()]
            out.append((d, sum(f.stat().st_size for f in files), max((f.stat().st_mtime for f in files), default=0)))
    return out


def prune_cache(keep: Path | None = None, limit: int = CACHE_LIMIT_BYTES) -> None:
    """Delete the least recently used entries beyond ``limit`` bytes (never ``keep``)."""
    try:
        total = 0
        for path, size, _ in sorted(_entries(), key=lambda e: e[2], reverse=True):
            total += size
            if total > limit and path != keep:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError:
        pass


def _identity(path: Path, extra: str = "") -> str:
    """A key naming one version of one file: device, inode, size, modification time (ns)."""
    st = path.stat()
    return hashlib.sha256(f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{extra}".encode()).hexdigest()[:40]


def _ready_key(graph: Path) -> str:
    import onnxruntime as ort

    return _identity(graph, ort.__version__)


def model_digest(path: str | Path) -> str:
    """The sha256 of a model file, remembered per file version (the identity above), so a 240 MB model is
    hashed once, not at every process start (0.15 s). A file modified in the last ``RACY_SECONDS`` is
    hashed every time (it could change again without its timestamp moving), as is any file when the
    cache cannot be written."""
    from insightad.io import atomic_write_bytes, file_sha256

    path = Path(path)
    try:
        memo = cache_dir() / DIGESTS / _identity(path)
        if memo.is_file():
            text = memo.read_text().strip()
            if len(text) == 64:
                return text
    except OSError:
        return file_sha256(path)
    digest = file_sha256(path)
    try:
        if time.time() - path.stat().st_mtime > RACY_SECONDS:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(memo, (digest + "\n").encode())
    except OSError:
        pass
    return digest


def ready_copy(graph: str | Path, source: str | Path | None = None) -> Path | None:
    """The session-ready copy of the graph file ``graph`` (made now if missing, after its content checksum is
    checked: ``InsightADError`` if it does not match), or None where it cannot be made (an unwritable cache, a
    graph ONNX Runtime cannot open: the caller opens the file itself and reports what is wrong with it).
    ``source``: build it from this file instead, the same graph in another
    form (the exporter's external-data twin, which ONNX Runtime loads holding each constant once)."""
    graph = Path(graph)
    try:
        folder = cache_dir() / READY / _ready_key(graph)
        target = folder / READY_GRAPH
        if target.is_file():  # folders appear whole (renamed into place); a small graph has no data file
            touch(target)
            return target
    except Exception:  # noqa: BLE001 - a cache that cannot serve never fails a prediction
        return None
    check_content(graph)  # made once per file identity: a damaged or edited graph is refused here, never made ready
    try:
        return _build_ready(Path(source) if source is not None else graph, folder)
    except Exception:  # noqa: BLE001 - a cache that cannot serve never fails a prediction
        return None


def _build_ready(graph: Path, folder: Path) -> Path | None:
    import onnxruntime as ort

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder.parent)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # not CPU-specific
        so.optimized_model_filepath = str(tmp / READY_GRAPH)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", READY_DATA)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(READY_MIN_BYTES))
        so.log_severity_level = 4
        release_free_memory()  # ONNX Runtime is about to load the graph's constants
        ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        if not (tmp / READY_GRAPH).is_file():
            return None
        try:
            os.rename(tmp, folder)
        except OSError:  # another process put its copy in place first: use that one
            if not (folder / READY_GRAPH).is_file():
                return None
        prune_cache(keep=folder)
        return folder / READY_GRAPH
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_builds(root: Path) -> None:
    now = time.time()
    for d in root.glob(".*.building"):
        try:
            if now - d.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
