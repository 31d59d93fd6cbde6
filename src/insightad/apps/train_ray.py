"""Distributed fit on Ray for methods whose fit is a reduction (``Detector.sharded_fit``).

The training images are cut into one contiguous shard per worker; each Ray task builds a fresh
detector with the same hyper-parameters (so the same backbone, projection and seed), runs the
method's shard step (PaDiM: per-patch sums; baseline: pooled features) and returns it through
the object store; the driver adds the sums or gathers the features and finishes the fit as a
single process would (held-out scoring, threshold). Every node must read the training paths
(a shared mount). A task whose worker dies is retried by Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from insightad.apps.batch_ray import connect, import_ray, worker_error
from insightad.errors import InsightADError


def _shard_step(method: str, params: dict[str, Any], name: str, images: Sequence[Any]) -> Any:
    """On a worker: a detector like the driver's, one shard's partial result."""
    import torch

    from insightad.methods import create_detector

    torch.set_num_threads(1)
    det = create_detector(method, **params)
    return getattr(det, name)(list(images))


def ray_shards(method: str, params: dict[str, Any], workers: int, address: str = "local",
               num_cpus: int | None = None, gpus_per_worker: float = 0.0):
    """A ``ShardRunner`` (see ``Detector.fit``) that runs each shard as a Ray task."""
    if workers < 1:
        raise InsightADError(f"--workers: expected at least 1, got {workers}")
    ray = import_ray()
    connect(address, num_cpus)
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 3}
    if gpus_per_worker > 0:
        options["num_gpus"] = gpus_per_worker
        params = {**params, "device": "cuda"}
    remote = ray.remote(**options)(_shard_step)

    def run(name: str, images: Sequence[Any]) -> list[Any]:
        n = len(images)
        k = max(1, min(workers, n))
        bounds = [round(i * n / k) for i in range(k + 1)]
        refs = [remote.remote(method, params, name, list(images[a:b])) for a, b in zip(bounds, bounds[1:]) if b > a]
        try:
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001 - a worker's InsightADError is one line, as in a single process
            found = worker_error(e)
            if found is None:
                raise
            raise found from None

    return run
