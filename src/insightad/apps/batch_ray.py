"""Batch scoring on Ray: Ray Data ``map_batches`` over an actor pool, each actor loading the model once.

The model file's bytes go to the object store once (``ray.put``); each actor copies them to a
node-local file named by their SHA-256 and loads it with ``load_for_inference`` (ONNX Runtime on
1 thread on CPU actors; PyTorch on CUDA with ``--gpus-per-worker``). Actors run the same
:func:`insightad.apps.batch.score_chunk` as the local runner, so scores are the same. The driver
commits every finished chunk as a part file (see ``apps.batch``): an actor that dies is restarted
by Ray and its chunk re-run (Ray Data retries actor tasks), and only chunks that came back are
committed, so nothing is lost or written twice. Maps and overlays go to folders every node can
write (a shared mount), written atomically by the actor that scored the image.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa

from insightad.apps.batch import BatchJob, BatchSummary, ScoreOptions, commit_tables, score_chunk
from insightad.errors import InsightADError
from insightad.io import atomic_write

INSTALL_HINT = "pip install 'insightad[ray]'"


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line message saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InsightADError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> float:
    """Start a local Ray instance (``local``) or join a cluster (``auto`` or ``HOST:PORT``); seconds it took.
    An instance this process already started (tests, notebooks) is used as it is."""
    ray = import_ray()
    t0 = time.perf_counter()
    if ray.is_initialized():
        return 0.0
    common: dict[str, Any] = {"include_dashboard": False, "configure_logging": True, "logging_level": "warning"}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **common)
        else:
            ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a running cluster" if address == "auto" else address
        raise InsightADError(f"--ray {address}: cannot join {where} ({str(e).splitlines()[0][:160]}); start one "
                             "with 'ray start --head' (then 'ray start --address HEAD:6379' on the other machines), "
                             "or use --ray local") from None
    return time.perf_counter() - t0


def check_gpus(ray: Any, gpus_per_worker: float, address: str) -> None:
    """An actor asking for more GPUs than the cluster has is never placed, and Ray waits for it forever (its
    autoscaler only logs 'No available node types can fulfill resource request'): refused on a ``local`` instance
    (nothing can add a GPU to it), a warning on a cluster (an autoscaler may add nodes)."""
    if gpus_per_worker <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have >= gpus_per_worker:
        return
    what = (f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster ({address}) has {have:g} GPUs, so no worker "
            "can start")
    if address == "local":
        raise InsightADError(f"{what}; leave --gpus-per-worker out (CPU workers on ONNX Runtime) or join a cluster "
                             "with GPUs (--ray auto|HOST:PORT)")
    warnings.warn(f"{what} until the cluster grows: the run waits for it (Ctrl-C to stop)", stacklevel=2)


def worker_error(e: BaseException) -> InsightADError | None:
    """The one-line error an InsightADError raised on a Ray worker carries (a bad training image, a model file an
    actor cannot load), found through Ray's wrappers; None for any other failure. Ray's own message for it holds
    the worker's whole traceback."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, InsightADError) and "Traceback" not in str(err) and "\n  File " not in str(err):
            return InsightADError(str(err))
        todo += [getattr(err, "cause", None), err.__cause__, err.__context__]
    return None


def node_model_copy(data: bytes, sha256: str, suffix: str) -> Path:
    """The model's bytes as a file on this node (shared by the actors here), written once, atomically."""
    target = Path(tempfile.gettempdir()) / "insightad-ray-models" / f"{sha256}{suffix}"
    if not (target.is_file() and target.stat().st_size == len(data)):
        atomic_write(target, lambda tmp: tmp.write_bytes(data))
    return target


class Scorer:
    """One Ray actor: loads the model once, then scores chunks of paths (a pyarrow table in, rows out)."""

    def __init__(self, model: list, suffix: str, opts: ScoreOptions, engine: str, device: str,
                 threads: int) -> None:
        import ray

        from insightad.inference.load import load_for_inference

        path = node_model_copy(ray.get(model[0]), opts.model_sha256, suffix)  # in a list: Ray passes the ref
        self.det = load_for_inference(path, engine, threads, device)
        self.det.workers = 0  # the actor has its CPU: decode here, no extra processes
        self.opts = opts

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_chunk(self.det, batch.column("path_bytes").to_pylist(), self.opts)


def run_ray(job: BatchJob, threshold: float, address: str = "local", workers: int = 2, num_cpus: int | None = None,
            gpus_per_worker: float = 0.0, engine: str = "auto", scorer: type = Scorer) -> BatchSummary:
    """Score the job on Ray with ``workers`` actors; part files are committed here as chunks come back.

    ``threshold`` is the model's threshold (or the override), read by the caller from the model file.
    """
    ray = import_ray()
    summary = BatchSummary(job.store.out, len(job.source.paths))
    with job.store.locked():
        todo = job.todo(threshold, summary)
        if todo:
            summary.startup_seconds = connect(address, num_cpus)
            check_gpus(ray, gpus_per_worker, address)
            commit_tables(job, _scored(ray, job, todo, workers, gpus_per_worker, engine, scorer), summary, len(todo))
        job.finish(summary)
    return summary


def _scored(ray: Any, job: BatchJob, todo: list[bytes], workers: int, gpus: float, engine: str, scorer: type):
    """Yield the scored chunks (pyarrow tables) as the actor pool finishes them."""
    from ray.data import DataContext

    if workers < 1:
        raise InsightADError(f"--workers: expected at least 1, got {workers}")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    blocks = [pa.table({"path_bytes": pa.array(todo[a:a + job.chunk], pa.binary())})
              for a in range(0, len(todo), job.chunk)]
    model_ref = ray.put(Path(job.model).read_bytes())
    device = "cuda" if gpus > 0 else "cpu"
    resources: dict[str, Any] = {"num_gpus": gpus} if gpus > 0 else {}
    ds = ray.data.from_arrow(blocks).map_batches(
        scorer, batch_size=job.chunk, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1, **resources,
        fn_constructor_kwargs={"model": [model_ref], "suffix": Path(job.model).suffix,
                               "opts": job.options(job.threshold), "engine": "torch" if gpus > 0 else engine,
                               "device": device, "threads": 1})
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    except Exception as e:  # noqa: BLE001 - an actor's InsightADError (its model copy unloadable) is one line
        found = worker_error(e)
        if found is None:
            raise
        raise found from None


def table_prediction(table: pa.Table, threshold: float) -> tuple[list[bytes], Any]:
    """A chunk's rows as (path bytes, Prediction): NaN score and an ``errors`` entry for error rows."""
    import numpy as np

    from insightad.scoring import Prediction

    nan = float("nan")
    scores = np.array([nan if v is None else v for v in table.column("score").to_pylist()], dtype=np.float64)
    normalized = np.array([nan if v is None else v for v in table.column("score_normalized").to_pylist()])
    labels = np.array([bool(v) for v in table.column("anomalous").to_pylist()], dtype=bool)
    errors = {i: e for i, e in enumerate(table.column("error").to_pylist()) if e is not None}
    return table.column("path_bytes").to_pylist(), Prediction(scores, None, threshold, labels, normalized, errors)


def sort_scorer(model: Path, threshold: float, address: str = "local", workers: int = 2, chunk: int = 32,
                num_cpus: int | None = None, engine: str = "auto"):
    """``FolderSorter``'s scorer on Ray: the batch actor pool scores, the sorter places each chunk as it
    comes back (journal, transfer, CSV), so sort's crash-safety is unchanged."""
    from insightad.apps.batch import ResultsStore, Source, file_sha256

    ray = import_ray()

    def score(paths: list[Path]):
        if not paths:
            return
        connect(address, num_cpus)
        raw = [os.fsencode(p) for p in paths]
        job = BatchJob(Path(model), Source(raw, b""), ResultsStore(Path(os.devnull)), threshold, chunk=chunk,
                       model_sha256=file_sha256(model))
        for table in _scored(ray, job, raw, workers, 0.0, engine, Scorer):
            got, pred = table_prediction(table, threshold)
            yield [Path(os.fsdecode(p)) for p in got], pred

    return score
