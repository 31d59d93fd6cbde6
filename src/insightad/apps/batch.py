"""Batch scoring: every image of a SOURCE scored once into a resumable Parquet table, here or on Ray.

One code path scores a chunk of inputs (:func:`score_chunk`): the local runner calls it in this
process, the Ray runner inside actors (``apps.batch_ray``). Results are committed per finished
chunk as a Parquet *part file* (written to a temporary name, fsync'ed, renamed), so a killed run
loses at most the chunks in flight; at the end the parts are merged into ``--out`` (again temp +
rename) and deleted. On restart the inputs already in ``--out`` or in a part file, for the same
model file (SHA-256 of its bytes), are skipped, unless their row is an error (tried again) or the
local file's size or mtime_ns differs from the row's (a new file under the name: scored again);
merging keeps the newest row of each (path, model), so no row is ever duplicated. An exclusive lock
file beside ``--out`` refuses a second run.

Paths are kept as their exact bytes (``path_bytes``) beside a display string (``path``), so a
name that is not valid UTF-8 round-trips.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from insightad.apps.batch_sources import Source, is_url, list_source
from insightad.apps.batch_store import SCHEMA, ResultsStore
from insightad.errors import InsightADError
from insightad.io import (
    atomic_write,
    file_identity,
    file_sha256,  # noqa: F401 - re-exported (results name the model by it)
    printable,
)

__all__ = ["SCHEMA", "BatchJob", "BatchSummary", "ResultsStore", "ScoreOptions", "Source", "file_sha256",
           "list_source", "run_local", "score_chunk"]


# ----------------------------------------------------------------------------- names
def display(path: bytes) -> str:
    """A path's bytes as a printable string; bytes that are not UTF-8 appear as ``\\xNN``."""
    return path.decode("utf-8", "backslashreplace")


def clean_text(text: str) -> str:
    """A message that may hold surrogate-escaped path bytes, made valid UTF-8 (Arrow, terminals)."""
    return printable(text)



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
    # taken before reading: a file changed while it is scored gets a newer identity, and is scored again
    idents = [None if is_url(p) else file_identity(os.fsdecode(p)) for p in paths]
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
        "size": pa.array([d[0] if d else None for d in idents], pa.int64()),
        "mtime_ns": pa.array([d[1] if d else None for d in idents], pa.int64()),
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
        atomic_write(target, lambda tmp: _save_npy(tmp, m))
        map_path = os.fsdecode(os.fsencode(target))
    if opts.overlays_dir:
        from insightad.data.images import load_image
        from insightad.render.colormap import MapScale
        from insightad.render.overlay import render_overlay

        image = load_image(source if isinstance(source, str) else bytes(source), 3)
        shown = MapScale.for_detector(det, opts.threshold) if m is not None else None
        img = render_overlay(image, float(pred.scores[j]), pred.threshold, anomaly_map=m, scale=shown,
                             score_normalized=float(pred.scores_normalized[j]))
        target = _mirror(opts.overlays_dir, opts, path, ".overlay.png")
        atomic_write(target, lambda tmp: img.save(tmp, format="PNG"))
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
    retried: int = 0
    changed: int = 0
    refreshed: int = 0
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
                "retried": self.retried, "changed": self.changed, "refreshed": self.refreshed,
                "errors": self.errors, "anomalous": self.anomalous,
                "seconds": round(self.seconds, 3),
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
        # absolute: a Ray actor on another node runs in a folder of Ray's, and the table's map/overlay columns
        # should name files a reader finds from anywhere
        self.maps_dir, self.overlays_dir = (os.path.abspath(os.path.expanduser(d)) if d else None
                                            for d in (self.maps_dir, self.overlays_dir))
        self.model_sha256 = self.model_sha256 or file_sha256(self.model)

    def options(self, threshold: float | None) -> ScoreOptions:
        return ScoreOptions(self.model_sha256, threshold, self.maps_dir, self.overlays_dir, self.source.root)

    def todo(self, threshold: float, summary: BatchSummary) -> list[bytes]:
        """Inputs to score for this model: those without a row, with an error row (tried again), or whose
        local file's size or mtime_ns differs from its row's (a new file under the name; a file gone since
        keeps its row), or whose row lacks a map or overlay this run asks for (``summary.refreshed``: a rerun
        with new --maps/--overlays writes them). The others are counted as ``summary.skipped``. A run left
        half-done at another threshold is refused (its rows would mix two decisions). Called with the lock held:
        temporaries a killed run left are removed first."""
        self.store.remove_leftovers()  # the caller holds the lock
        done = self.store.done(self.model_sha256)
        todo: list[bytes] = []
        kept: list[bytes] = []
        for p in self.source.paths:
            row = done.get(p)
            if row is not None and row[1]:
                summary.retried += 1
            elif row is not None and row[2] is not None and row[2] != (file_identity(os.fsdecode(p)) or row[2]):
                summary.changed += 1
            elif row is not None and self._lacks_outputs(p, row[3], row[4]):
                summary.refreshed += 1
            elif row is not None:
                kept.append(p)
                continue
            todo.append(p)
        for p in kept[:1]:
            old = done[p][0]
            if old is not None and not np.isclose(old, threshold, rtol=1e-9, atol=0.0):
                raise InsightADError(f"{self.store.out}: holds rows of this model at threshold {old:.9g}, not "
                                     f"{threshold:.9g}; pass --threshold {old!r} to finish it, or choose another --out")
        summary.skipped = len(kept)
        return todo

    def _lacks_outputs(self, path: bytes, map_file: str | None, overlay_file: str | None) -> bool:
        """Whether a committed row lacks the map or overlay asked for now: none recorded, or none at its
        place under the --maps/--overlays folder of this run."""
        opts = self.options(self.threshold)
        for base, recorded, suffix in ((self.maps_dir, map_file, ".map.npy"),
                                       (self.overlays_dir, overlay_file, ".overlay.png")):
            if base and (recorded is None or not _mirror(base, opts, path, suffix).is_file()):
                return True
        return False

    def chunks(self, todo: list[bytes]) -> Iterator[list[bytes]]:
        for a in range(0, len(todo), self.chunk):
            yield todo[a:a + self.chunk]

    def finish(self, summary: BatchSummary) -> pa.Table:
        """Merge the parts into ``--out`` and count this job's rows (errors, anomalous). Every input has its row,
        or the job fails saying so (committed parts removed while it ran: its summary would count rows that
        are not there)."""
        t = self.store.consolidate()
        mine = set(self.source.paths)
        keys = zip(t.column("path_bytes").to_pylist(), t.column("model_sha256").to_pylist(),
                   t.column("error").to_pylist(), t.column("anomalous").to_pylist())
        found = 0
        for p, m, err, anom in keys:
            if m != self.model_sha256 or p not in mine:
                continue
            found += 1
            if err is not None:
                summary.errors += 1
                if len(summary.error_examples) < 5:
                    summary.error_examples.append(err)
            elif anom:
                summary.anomalous += 1
        if found < len(mine):
            raise InsightADError(f"{self.store.out}: {len(mine) - found} of {len(mine)} inputs have no row (results "
                                 f"committed in {self.store.parts_dir} were removed while the job ran); run the same "
                                 "command again to score them")
        return t


def run_local(job: BatchJob, det) -> BatchSummary:
    """Score the job in this process, committing a part file per chunk (the path ``predict`` takes)."""
    thr = float(det.threshold_ if job.threshold is None else job.threshold)
    summary = BatchSummary(job.store.out, len(job.source.paths))
    with job.store.locked():
        todo = job.todo(thr, summary)
        opts = job.options(job.threshold)
        commit_tables(job, (score_chunk(det, part, opts) for part in job.chunks(todo)), summary, len(todo))
        job.finish(summary)
    return summary


def commit_tables(job: BatchJob, tables: Iterable[Any], summary: BatchSummary, total: int) -> None:
    """Commit each scored chunk as it arrives (the resumable store), with progress; wall time into ``summary``.
    Shared by the local runner and the Ray runner."""
    bar = Progress(total, job.progress)
    t0 = time.perf_counter()
    try:
        for table in tables:
            job.store.commit(table)
            summary.scored += table.num_rows
            bar.update(table)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
