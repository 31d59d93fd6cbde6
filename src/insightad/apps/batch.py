"""Batch scoring: every image of a SOURCE scored once into a resumable Parquet table, here or on Ray.

One code path scores a chunk of inputs (:func:`score_chunk`): the local runner calls it in this
process, the Ray runner inside actors (``apps.batch_ray``). Results are committed per finished
chunk as a Parquet *part file* (written to a temporary name, fsync'ed, renamed), so a killed run
loses at most the chunks in flight; at the end the parts are merged into ``--out`` (again temp +
rename) and deleted. On restart the inputs already in ``--out`` or in a part file, for the same
model file (SHA-256 of its bytes), are skipped; merging keeps the first row of each (path, model),
so no row is ever duplicated. An exclusive lock file beside ``--out`` refuses a second run.

Paths are kept as their exact bytes (``path_bytes``) beside a display string (``path``), so a
name that is not valid UTF-8 round-trips.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import glob as globlib
import hashlib
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from insightad.data.images import IMAGE_EXTENSIONS, is_image_file
from insightad.errors import InsightADError

SCHEMA = pa.schema([
    ("path", pa.string()),
    ("path_bytes", pa.binary()),
    ("score", pa.float64()),
    ("score_normalized", pa.float64()),
    ("anomalous", pa.bool_()),
    ("threshold", pa.float64()),
    ("error", pa.string()),
    ("model_sha256", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("map", pa.string()),
    ("overlay", pa.string()),
])
GLOB_CHARS = ("*", "?", "[")


# ----------------------------------------------------------------------------- names
def display(path: bytes) -> str:
    """A path's bytes as a printable string; bytes that are not UTF-8 appear as ``\\xNN``."""
    return path.decode("utf-8", "backslashreplace")


def clean_text(text: str) -> str:
    """A message that may hold surrogate-escaped path bytes, made valid UTF-8 (Arrow, terminals)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_url(path: bytes) -> bool:
    return b"://" in path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """The inputs of a job (exact path bytes, in order, no repeats) and the root their names mirror from."""

    paths: list[bytes]
    root: bytes

    def relative(self, path: bytes) -> bytes:
        rel = path[len(self.root):] if self.root and path.startswith(self.root) else path
        return rel.lstrip(b"/") or os.path.basename(path)


def _walk(root: bytes) -> Iterator[bytes]:
    """Image files under ``root`` (regular files, symlinks to files included), sorted, hidden skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if is_image_file(Path(os.fsdecode(name))) and os.path.isfile(p):
                yield p


def _unique(paths: Sequence[bytes]) -> list[bytes]:
    return list(dict.fromkeys(paths))


def _url_source(spec: str) -> Source:
    """A source on an fsspec file system (``s3://``, ``gs://``, ``file://``...): folder, glob or list."""
    import fsspec

    fs, where = fsspec.core.url_to_fs(spec)
    proto = spec.split("://", 1)[0] + "://"
    if any(c in where for c in GLOB_CHARS):
        found = [p for p in fs.glob(where) if p.lower().endswith(IMAGE_EXTENSIONS)]
        root = where.split("*")[0].rsplit("/", 1)[0]
    elif fs.isdir(where):
        found = [p for p in fs.find(where) if is_image_file(Path(p))]
        root = where
    elif fs.isfile(where):
        with fs.open(where, "rb") as f:
            found = [ln.decode("utf-8", "surrogateescape").strip() for ln in f.read().splitlines()]
        found = [p for p in found if p and not p.startswith("#")]
        return Source(_unique([os.fsencode(p) for p in found]), b"")
    else:
        raise InsightADError(f"{spec}: no such folder, file or glob")
    paths = [os.fsencode(p if "://" in p else proto + p) for p in sorted(found)]
    return Source(_unique(paths), os.fsencode(proto + root))


def list_source(spec: str) -> Source:
    """A folder (recursive), a text file of paths (one a line; relative ones from the file's folder),
    or a glob (``**`` recursive). A listed path that does not exist becomes an error row later."""
    if "://" in spec:
        return _url_source(spec)
    raw = os.fsencode(os.path.expanduser(spec))
    if any(c.encode() in raw for c in GLOB_CHARS) and not os.path.exists(raw):
        found = sorted(p for p in globlib.glob(raw, recursive=True)
                       if os.path.isfile(p) and is_image_file(Path(os.fsdecode(p))))
        prefix = raw[:min(raw.find(c.encode()) for c in GLOB_CHARS if c.encode() in raw)]
        root = os.path.dirname(prefix)
        if not found:
            raise InsightADError(f"{spec}: the glob matches no image files "
                                 f"(expected {', '.join(IMAGE_EXTENSIONS)})")
        return Source(_unique([os.path.abspath(p) for p in found]), os.path.abspath(root or b"."))
    if os.path.isdir(raw):
        found = list(_walk(os.path.abspath(raw)))
        if not found:
            raise InsightADError(f"{spec}: no images found in this folder (expected {', '.join(IMAGE_EXTENSIONS)})")
        return Source(found, os.path.abspath(raw))
    if os.path.isfile(raw):
        with open(raw, "rb") as f:
            head = f.read(4096)
        if is_image_file(Path(spec)) or b"\x00" in head:
            raise InsightADError(f"{spec}: expected a folder, a glob or a text file of image paths (one a line), "
                                 "got an image or a binary file")
        base = os.path.dirname(os.path.abspath(raw))
        with open(raw, "rb") as f:
            lines = [ln.rstrip(b"\r").strip() for ln in f.read().splitlines()]
        paths = [ln if is_url(ln) else os.path.normpath(os.path.join(base, ln))
                 for ln in lines if ln and not ln.startswith(b"#")]
        if not paths:
            raise InsightADError(f"{spec}: the list of paths is empty (expected one image path a line)")
        local = [p for p in paths if not is_url(p)]
        root = os.path.commonpath([os.path.dirname(p) for p in local]) if local else b""
        return Source(_unique(paths), root)
    raise InsightADError(f"{spec}: no such folder, file or glob")


# ----------------------------------------------------------------------------- results store
@dataclass
class ResultsStore:
    """``out`` (the merged Parquet table), ``out.parts/`` (committed chunks) and ``out.lock``."""

    out: Path
    csv: Path | None = None
    _seq: int = 0

    @property
    def parts_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    @property
    def lock_path(self) -> Path:
        return self.out.with_name(self.out.name + ".lock")

    def check(self) -> None:
        """Refuse outputs that cannot be written, before any work starts."""
        for p in [self.out] + ([self.csv] if self.csv else []):
            if p.is_dir():
                raise InsightADError(f"{p}: is a folder; expected a results file name (e.g. results.parquet)")
            parent = p.parent if str(p.parent) else Path(".")
            parent.mkdir(parents=True, exist_ok=True)
            if not os.access(parent, os.W_OK):
                raise InsightADError(f"{p}: cannot write in {parent}")
        if self.out.exists():
            try:
                got = pq.read_schema(self.out)
            except Exception:  # noqa: BLE001
                raise InsightADError(f"{self.out}: exists and is not a Parquet file; choose another --out") from None
            if "path_bytes" not in got.names or "model_sha256" not in got.names:
                raise InsightADError(f"{self.out}: exists and is not an insightad batch results table; "
                                     "choose another --out")

    def _part_files(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """The merged table and every committed part, in commit order (duplicates not yet removed)."""
        tables = [pq.read_table(self.out, columns=columns)] if self.out.exists() else []
        tables += [pq.read_table(p, columns=columns) for p in self._part_files()]
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()

    def done(self, model_sha: str) -> dict[bytes, tuple[float, bool]]:
        """path bytes -> (threshold, is error) of the rows already committed for this model."""
        t = self.read_all(["path_bytes", "model_sha256", "threshold", "error"])
        out: dict[bytes, tuple[float, bool]] = {}
        for p, m, thr, err in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            if m == model_sha and p not in out:
                out[p] = (thr, err is not None)
        return out

    def commit(self, table: pa.Table) -> Path:
        """Write one chunk's rows as a part file: temp name, fsync, rename, fsync the folder."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.parquet"
        target = self.parts_dir / name
        durable_write(target, lambda tmp: pq.write_table(table.cast(SCHEMA), tmp))
        return target

    def consolidate(self) -> pa.Table:
        """Merge ``out`` and the parts (first row of each (path, model) wins), write ``out`` (and the CSV)
        atomically, then delete the parts: a kill at any point leaves nothing lost or duplicated."""
        parts = self._part_files()
        t = self.read_all()
        seen: set[tuple[bytes, str]] = set()
        keep = []
        for i, key in enumerate(zip(t.column("path_bytes").to_pylist(), t.column("model_sha256").to_pylist())):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        t = t.take(pa.array(keep, pa.int64())) if len(keep) != t.num_rows else t
        t = t.sort_by([("model_sha256", "ascending"), ("path_bytes", "ascending")])
        durable_write(self.out, lambda tmp: pq.write_table(t, tmp))
        if self.csv is not None:
            import pyarrow.csv as pacsv

            durable_write(self.csv, lambda tmp: pacsv.write_csv(t.drop_columns(["path_bytes"]), tmp))
        for p in parts:
            p.unlink(missing_ok=True)
        if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()
        return t


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def durable_write(path: Path, write: Any) -> None:
    """``write(tmp)`` to a hidden temporary name beside ``path``, fsync it, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def output_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``lock_path`` for the run; a second run is refused at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            raise InsightADError(f"{what}: another run is writing it (lock {lock_path} held by pid {holder}); wait "
                                 "for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock; the file stays (harmless, reused)


# ----------------------------------------------------------------------------- scoring one chunk
@dataclass(frozen=True)
class ScoreOptions:
    """What every scorer (this process or a Ray actor) needs besides the model."""

    model_sha256: str
    threshold: float | None = None
    maps_dir: str | None = None
    overlays_dir: str | None = None
    root: bytes = b""


def read_source(path: bytes) -> str | bytes:
    """What the detector reads: a local path (only a regular file: a FIFO would block) or a URL's bytes."""
    if is_url(path):
        import fsspec

        with fsspec.open(os.fsdecode(path), "rb") as f:
            return f.read()
    name = os.fsdecode(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise InsightADError(f"{name}: file not found") from None
    except OSError as e:
        raise InsightADError(f"{name}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InsightADError(f"{name}: not a regular file")
    return name


def _mirror(base: str, opts: ScoreOptions, path: bytes, suffix: str) -> Path:
    rel = Source([], opts.root).relative(path)
    if is_url(rel):
        rel = rel.split(b"://", 1)[1].lstrip(b"/")
    return Path(base) / (os.fsdecode(rel) + suffix)


def score_chunk(det, paths: Sequence[bytes], opts: ScoreOptions) -> pa.Table:
    """One row per path, whatever happens to it: scores, decision, or the error that stopped it."""
    now = dt.datetime.now(dt.timezone.utc)
    n = len(paths)
    errors: dict[int, str] = {}
    sources: list[str | bytes] = []
    where: list[int] = []
    for i, p in enumerate(paths):
        try:
            sources.append(read_source(p))
            where.append(i)
        except InsightADError as e:
            errors[i] = str(e)
        except Exception as e:  # noqa: BLE001 - one unreadable input is one error row, never a failed job
            errors[i] = f"{display(p)}: cannot read ({type(e).__name__}: {e})"
    scores = np.full(n, np.nan)
    normalized = np.full(n, np.nan)
    anomalous: list[bool | None] = [None] * n
    maps_out: list[str | None] = [None] * n
    overlays_out: list[str | None] = [None] * n
    want_maps = bool(det.has_maps and (opts.maps_dir or opts.overlays_dir))
    thr = float(det.threshold_ if opts.threshold is None else opts.threshold)
    if sources:
        pred = det.predict(sources, maps=want_maps, strict=False, threshold=opts.threshold)
        for j, i in enumerate(where):
            if j in pred.errors:
                errors[i] = pred.errors[j]
                continue
            if not np.isfinite(pred.scores[j]):
                errors[i] = f"{display(paths[i])}: the model gave a non-finite score ({pred.scores[j]})"
                continue
            scores[i], normalized[i], anomalous[i] = pred.scores[j], pred.scores_normalized[j], bool(pred.labels[j])
            m = pred.maps[j] if want_maps and pred.maps is not None else None
            try:
                maps_out[i], overlays_out[i] = _write_extras(det, opts, paths[i], sources[j], m, pred, j)
            except OSError as e:
                errors[i] = f"{display(paths[i])}: scored, but its map/overlay could not be written ({e})"
                scores[i], normalized[i], anomalous[i] = np.nan, np.nan, None
    ok = [i not in errors for i in range(n)]
    return pa.table({
        "path": [display(p) for p in paths],
        "path_bytes": pa.array(list(paths), pa.binary()),
        "score": pa.array([float(s) if k else None for s, k in zip(scores, ok)], pa.float64()),
        "score_normalized": pa.array([float(s) if k else None for s, k in zip(normalized, ok)], pa.float64()),
        "anomalous": pa.array(anomalous, pa.bool_()),
        "threshold": pa.array([thr] * n, pa.float64()),
        "error": pa.array([clean_text(errors[i]) if i in errors else None for i in range(n)], pa.string()),
        "model_sha256": pa.array([opts.model_sha256] * n, pa.string()),
        "time": pa.array([now] * n, pa.timestamp("ms", tz="UTC")),
        "map": pa.array([clean_text(m) if m else None for m in maps_out], pa.string()),
        "overlay": pa.array([clean_text(o) if o else None for o in overlays_out], pa.string()),
    }, schema=SCHEMA)


def _save_npy(path: Path, m: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a name would add ".npy" to the temporary name
        np.save(f, np.asarray(m, np.float32))


def _write_extras(det, opts: ScoreOptions, path: bytes, source: str | bytes, m, pred, j: int
                  ) -> tuple[str | None, str | None]:
    """The map (float32 ``.npy``) and overlay (PNG) of one image, each written to a temp name and renamed."""
    map_path = overlay_path = None
    if opts.maps_dir and m is not None:
        target = _mirror(opts.maps_dir, opts, path, ".map.npy")
        durable_write(target, lambda tmp: _save_npy(tmp, m))
        map_path = os.fsdecode(os.fsencode(target))
    if opts.overlays_dir:
        from insightad.apps.overlay import MapDisplay, render_overlay
        from insightad.data.images import load_image

        image = load_image(source if isinstance(source, str) else bytes(source), 3)
        shown = MapDisplay.for_detector(det, opts.threshold) if m is not None else None
        img = render_overlay(image, float(pred.scores[j]), pred.threshold, anomaly_map=m, display=shown,
                             score_normalized=float(pred.scores_normalized[j]))
        target = _mirror(opts.overlays_dir, opts, path, ".overlay.png")
        durable_write(target, lambda tmp: img.save(tmp, format="PNG"))
        overlay_path = str(target)
    return map_path, overlay_path


# ----------------------------------------------------------------------------- the job
@dataclass
class BatchSummary:
    """What a run did, and the state of the results for this model and these inputs."""

    out: Path
    inputs: int
    scored: int = 0
    skipped: int = 0
    errors: int = 0
    anomalous: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "inputs": self.inputs, "scored": self.scored, "skipped": self.skipped,
                "errors": self.errors, "anomalous": self.anomalous, "seconds": round(self.seconds, 3),
                "startup_seconds": round(self.startup_seconds, 3),
                "images_per_second": round(self.images_per_second, 3)}


class Progress:
    """done/total, images/s and errors on stderr (a tqdm bar when asked for)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.errors = 0
        self.bar = tqdm(total=total, desc="batch", unit="img", disable=not enabled, file=sys.stderr)

    def update(self, table: pa.Table) -> None:
        self.errors += table.num_rows - table.column("error").null_count
        self.bar.update(table.num_rows)
        self.bar.set_postfix(errors=self.errors, refresh=False)

    def close(self) -> None:
        self.bar.close()


@dataclass
class BatchJob:
    """One ``insightad batch``: a model file, a source, a results store and where maps/overlays go."""

    model: Path
    source: Source
    store: ResultsStore
    threshold: float | None = None
    maps_dir: str | None = None
    overlays_dir: str | None = None
    chunk: int = 64
    progress: bool = False
    model_sha256: str = ""

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise InsightADError(f"--chunk: expected at least 1, got {self.chunk}")
        self.model_sha256 = self.model_sha256 or file_sha256(self.model)

    def options(self, threshold: float) -> ScoreOptions:
        return ScoreOptions(self.model_sha256, threshold, self.maps_dir, self.overlays_dir, self.source.root)

    def todo(self, threshold: float) -> tuple[list[bytes], int]:
        """Inputs without a committed row for this model, and how many were done earlier. A run left
        half-done at another threshold is refused (its rows would mix two decisions)."""
        done = self.store.done(self.model_sha256)
        wanted = [p for p in self.source.paths if p in done]
        for p in wanted[:1]:
            old = done[p][0]
            if old is not None and not np.isclose(old, threshold, rtol=1e-9, atol=0.0):
                raise InsightADError(f"{self.store.out}: holds rows of this model at threshold {old:.9g}, not "
                                     f"{threshold:.9g}; pass --threshold {old!r} to finish it, or choose another --out")
        return [p for p in self.source.paths if p not in done], len(wanted)

    def chunks(self, todo: list[bytes]) -> Iterator[list[bytes]]:
        for a in range(0, len(todo), self.chunk):
            yield todo[a:a + self.chunk]

    def finish(self, summary: BatchSummary) -> pa.Table:
        """Merge the parts into ``--out`` and count this job's rows (errors, anomalous)."""
        t = self.store.consolidate()
        mine = set(self.source.paths)
        keys = zip(t.column("path_bytes").to_pylist(), t.column("model_sha256").to_pylist(),
                   t.column("error").to_pylist(), t.column("anomalous").to_pylist())
        for p, m, err, anom in keys:
            if m != self.model_sha256 or p not in mine:
                continue
            if err is not None:
                summary.errors += 1
                if len(summary.error_examples) < 5:
                    summary.error_examples.append(err)
            elif anom:
                summary.anomalous += 1
        return t


def run_local(job: BatchJob, det) -> BatchSummary:
    """Score the job in this process, committing a part file per chunk (the path ``predict`` takes)."""
    thr = float(det.threshold_ if job.threshold is None else job.threshold)
    summary = BatchSummary(job.store.out, len(job.source.paths))
    with output_lock(job.store.lock_path, str(job.store.out)):
        todo, summary.skipped = job.todo(thr)
        opts = job.options(job.threshold)
        bar = Progress(len(todo), job.progress)
        t0 = time.perf_counter()
        try:
            for part in job.chunks(todo):
                table = score_chunk(det, part, opts)
                job.store.commit(table)
                summary.scored += table.num_rows
                bar.update(table)
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - t0
        job.finish(summary)
    return summary
