"""The scoring service behind the routes: admission, decoding off the event loop, the inference
worker, and the answer - built from the same ``Prediction.record`` as ``insightad predict --json``."""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException

from insightad.apps.serve.codec import DecodedImage, decode_base64, decode_image, heatmap_png
from insightad.apps.serve.metrics import ServerMetrics
from insightad.apps.serve.settings import ServeParams
from insightad.apps.serve.worker import InferenceWorker, Job, QueueFull, Result, WorkerStopped
from insightad.methods.base import Detector, upsample_maps
from insightad.render.colormap import MapScale
from insightad.version import __version__

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def answer_record(record: dict[str, Any], method: str) -> dict[str, Any]:
    """The HTTP answer of one image: the original contract's ``Anomaly`` plus the shared record (``anomalous``,
    score, score_normalized, threshold) and the method."""
    return {"Anomaly": bool(record["anomalous"]), "anomalous": bool(record["anomalous"]), "score": record["score"],
            "score_normalized": record["score_normalized"], "threshold": record["threshold"], "method": method}


def model_info(det: Detector, threshold: float) -> dict[str, Any]:
    """What ``/model`` shows: method, backbone, threshold and how it was chosen, preprocessing, versions."""
    from insightad.model_file import metadata

    meta = getattr(det, "metadata_", None) or (metadata(det) if det.model_ is not None else {})
    thr = dict(meta.get("threshold") or {"value": det.threshold_, "strategy": det.threshold_strategy_})
    if threshold != det.threshold_:
        thr = {"value": threshold, "strategy": "override (serve --threshold)", "model_value": det.threshold_}
    path = getattr(det, "model_path_", None)
    return {
        "method": det.method, "has_maps": bool(det.has_maps), "backbone": meta.get("backbone"),
        "threshold": thr, "preprocessing": meta.get("preprocessing") or det.preprocessing_.to_dict(),
        "version": {"insightad": __version__, "model_written_by": meta.get("package_version"),
                    "model_format_version": meta.get("format_version"), "model_created": meta.get("created"),
                    "model_file": Path(path).name if path else None},
        "params": meta.get("params") or det.get_params(),
    }


class ScoringService:
    """One served detector: decode requests in a few threads, score them on the worker, answer."""

    def __init__(self, det: Detector, threshold: float, settings: ServeParams) -> None:
        self.det, self.threshold, self.settings = det, threshold, settings
        self.metrics = ServerMetrics()
        self.worker = InferenceWorker(det, settings.max_batch, settings.batch_wait_ms, settings.queue_size,
                                      settings.threads, on_batch=self.metrics.observe_batch)
        self.metrics.watch_queue(lambda: self.worker.pending)
        self.scale = MapScale.for_detector(det, threshold) if det.has_maps else None
        self.info = model_info(det, threshold)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # A few threads parse and decode: more would only contend for the cores (and hold more memory).
        self.io_pool = ThreadPoolExecutor(settings.decode_threads or min(4, cores),
                                          thread_name_prefix="insightad-decode")

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, functools.partial(fn, *args))

    def close(self) -> None:
        self.worker.stop()
        self.io_pool.shutdown(wait=False, cancel_futures=True)

    def decode_all(self, items: list[tuple[str, str | bytes]]) -> list[DecodedImage]:
        out = []
        for field, payload in items:
            data = decode_base64(payload, field) if isinstance(payload, str) else payload
            out.append(decode_image(data, self.det.preprocessing_, self.settings.max_pixels, field))
        return out

    def answer(self, results: list[Result], decoded: list[DecodedImage]) -> list[dict[str, Any]]:
        pred = self.det.decide(np.array([r.score for r in results]), threshold=self.threshold)
        out = []
        for i, (res, img) in enumerate(zip(results, decoded)):
            if not np.isfinite(res.score):
                raise RuntimeError(f"the model produced a non-finite score ({res.score})")
            item = answer_record(pred.record(i), self.det.method)
            if res.map is not None and self.scale is not None:
                amap = upsample_maps(res.map[None], [img.size])[0]
                item["heatmap"] = heatmap_png(amap, self.scale)
                item["heatmap_level"], item["heatmap_scale"] = self.scale.level, self.scale.scale
            out.append(item)
        return out

    async def score(self, items: list[tuple[str, str | bytes]], want_maps: bool) -> list[dict[str, Any]]:
        """Admit (or 503), decode, run on the worker within the deadline, answer."""
        worker, settings = self.worker, self.settings
        try:
            worker.admit()
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise HTTPException(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        except WorkerStopped as e:
            raise HTTPException(503, str(e)) from None
        submitted = False
        try:
            decoded = await self.off_loop(self.decode_all, items)
            job = Job([d.tensor for d in decoded], want_maps and self.det.has_maps)
            submitted = True  # from here the worker owns the slot
            future = worker.submit(job)
            try:
                results = await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(503, f"inference did not finish within {settings.timeout_s:g} s "
                                         "(--timeout-s); the server is overloaded") from None
        except WorkerStopped as e:
            raise HTTPException(503, str(e)) from None
        finally:
            if not submitted:
                worker.release()
        if job.want_maps:
            return await self.off_loop(self.answer, results, decoded)
        return self.answer(results, decoded)
