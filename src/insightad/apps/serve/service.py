"""The scoring service behind the routes: admission, decoding off the event loop, the inference
worker, and the answer - built from the same ``Prediction.record`` as ``insightad predict --json``."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException

from insightad.apps.serve.codec import (
    DecodedImage,
    decode_base64,
    decode_image,
    heatmap_png,
    heatmap_size,
)
from insightad.apps.serve.metrics import ServerMetrics
from insightad.apps.serve.settings import ServeParams
from insightad.apps.serve.worker import InferenceWorker, Job, QueueFull, Result, WorkerStopped
from insightad.data.images import header_pixels
from insightad.render.colormap import MapScale
from insightad.scoring import Scorer
from insightad.scoring.scorer import upsample_maps
from insightad.version import __version__

Items = list[tuple[str, str | bytes]]  # (field name, base64 text or raw bytes) per image


def answer_record(record: dict[str, Any], method: str) -> dict[str, Any]:
    """The HTTP answer of one image: the original contract's ``Anomaly`` plus the shared record (``anomalous``,
    score, score_normalized, threshold) and the method."""
    return {"Anomaly": bool(record["anomalous"]), "anomalous": bool(record["anomalous"]), "score": record["score"],
            "score_normalized": record["score_normalized"], "threshold": record["threshold"], "method": method}


# Keys whose values name server folders or image files (calibration data, its warnings, the split).
PRIVATE_DETAILS = frozenset({"data", "images", "root", "path", "paths", "split", "files", "model", "warnings"})


def _public(value: Any) -> Any:
    """Threshold details without server paths or image names (lists of names, 'data' folders)."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if k not in PRIVATE_DETAILS}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def model_info(det: Scorer, threshold: float) -> dict[str, Any]:
    """What ``/model`` shows: method, backbone, threshold and how it was chosen, preprocessing, versions;
    no server paths and no image names (an operator needs neither, a stranger should see neither)."""
    meta = getattr(det, "metadata_", None)
    if not meta and getattr(det, "model_", None) is not None:  # a model fitted in this process (tests, demo)
        from insightad.model_file import metadata

        meta = metadata(det)  # type: ignore[arg-type]  # a Detector: it holds a PyTorch model
    meta = meta or {}
    thr = _public(dict(meta.get("threshold") or {"value": det.threshold_, "strategy": det.threshold_strategy_}))
    if threshold != det.threshold_:
        thr = {"value": threshold, "strategy": "override (serve --threshold)", "model_value": det.threshold_}
    path = getattr(det, "model_path_", None)
    return {
        "method": det.method, "has_maps": bool(det.has_maps), "backbone": meta.get("backbone"),
        "threshold": thr, "preprocessing": meta.get("preprocessing") or det.preprocessing_.to_dict(),
        "version": {"insightad": __version__, "model_written_by": meta.get("package_version"),
                    "model_format_version": meta.get("format_version"), "model_created": meta.get("created"),
                    "model_file": Path(path).name if path else None},
        "params": _public(meta.get("params") or getattr(det, "get_params", dict)()),
    }


class PixelBudget:
    """Decoded pixels held by all requests together, bounded. --queue-size bounds how many requests are held and
    --max-pixels how large each is, but a 120 kB PNG can declare 36 million pixels (108 MB decoded, more in
    inference): 32 such requests at once took the server from 0.1 to 4.4 GB. Each image's pixels (from its
    header) are taken before it is decoded and given back when its request ends; what does not fit is 503."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        with self._lock:
            if self.held + pixels > self.limit:
                return False
            self.held += pixels
            return True

    def give_back(self, pixels: int) -> None:
        with self._lock:
            self.held -= pixels


class Reservation:
    """One request's share of the ``PixelBudget``; ``close`` gives it all back, and a decode thread still
    running for a request that has ended (timed out, client gone) can take nothing more."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget, self.pixels, self.closed = budget, 0, False
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        with self._lock:
            if self.closed or not self.budget.take(pixels):
                return False
            self.pixels += pixels
            return True

    def give_back(self, pixels: int) -> None:
        with self._lock:
            pixels = min(pixels, self.pixels)
            self.pixels -= pixels
            self.budget.give_back(pixels)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.budget.give_back(self.pixels)
            self.pixels = 0


class ClientSlots:
    """Scoring requests each client address has open, bounded by ``limit`` (0: counted, never refused): one camera
    PC sending in parallel could take every --queue-size slot, and the other stations of the line got 503 until it
    stopped. An address is forgotten when its last request ends, so the table holds only clients with requests open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self._lock = threading.Lock()  # (uvicorn calls from one event loop; a test client may call from several)

    def take(self, client: str) -> bool:
        with self._lock:
            held = self.open.get(client, 0)
            if self.limit and held >= self.limit:
                return False
            self.open[client] = held + 1
            return True

    def give_back(self, client: str) -> None:
        with self._lock:
            held = self.open.pop(client, 0) - 1
            if held > 0:
                self.open[client] = held


def too_many_from(client: str, limit: int) -> str:
    """What a 429 says: whose requests, the limit and the setting that sets it."""
    return (f"too many requests from {client[:60]}: it already has {limit} scoring requests open, this server's "
            "limit per client (--max-requests-per-client); wait for an answer before sending more, or retry shortly")


class ScoringService:
    """One served detector: decode requests in a few threads, score them on the worker, answer."""

    def __init__(self, det: Scorer, threshold: float, settings: ServeParams) -> None:
        self.det, self.threshold, self.settings = det, threshold, settings
        self.metrics = ServerMetrics()
        self.worker = InferenceWorker(det, settings.max_batch, settings.batch_wait_ms, settings.queue_size,
                                      settings.threads, on_batch=self.metrics.observe_batch)
        self.metrics.watch_queue(lambda: self.worker.pending)
        self.scale = MapScale.for_detector(det, threshold) if det.has_maps else None
        self.info = model_info(det, threshold)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # A few threads parse and decode: more would only contend for the cores (and hold more memory).
        self._request = threading.local()  # the request a decode thread is decoding for (its Reservation)
        self.clients = ClientSlots(settings.max_requests_per_client)
        self.pixels = PixelBudget(max(settings.max_pixels_in_flight or 2 * settings.max_pixels, settings.max_pixels))
        self.io_pool = ThreadPoolExecutor(settings.decode_threads or min(4, cores),
                                          thread_name_prefix="insightad-decode")

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, functools.partial(fn, *args))

    def close(self) -> None:
        self.worker.stop()
        self.io_pool.shutdown(wait=False, cancel_futures=True)

    def _decode_holding(self, items: Items, held: Reservation) -> list[DecodedImage]:
        """``decode_all`` in a decode thread, taking the pixels it decodes from ``held``."""
        self._request.held = held
        try:
            return self.decode_all(items)
        finally:
            self._request.held = None

    def decode_all(self, items: Items) -> list[DecodedImage]:
        """Decode every image; the pixels decoded for one request are bounded by --max-pixels in total
        (each image is checked against what is left before it is decoded), and those of all requests together
        by the server's pixel budget (this request's share, taken before each image is decoded)."""
        held: Reservation | None = getattr(self._request, "held", None)
        out, left = [], self.settings.max_pixels
        for field, payload in items:
            data = decode_base64(payload, field) if isinstance(payload, str) else payload
            pixels = header_pixels(data) or 0
            if left < self.settings.max_pixels and pixels > left:  # over what the earlier images left
                raise HTTPException(413, f"{field}: the images of this request together exceed this server's "
                                         f"limit of {self.settings.max_pixels} decoded pixels per request "
                                         "(--max-pixels); send fewer or smaller images")
            if held is not None and pixels <= self.settings.max_pixels and not held.take(pixels):
                self.metrics.rejected.inc()
                raise HTTPException(503, f"server busy: {field} has {pixels} pixels and the images being scored "
                                         f"already hold {self.pixels.held} of the {self.pixels.limit} decoded pixels "
                                         "this server holds at once (--max-pixels-in-flight); retry shortly",
                                    headers={"Retry-After": "1"})
            out.append(decode_image(data, self.det, min(left, self.settings.max_pixels), field))
            if held is not None and not self.det.decoded_input:  # the engine keeps only the model-size copy
                held.give_back(pixels)
            left -= pixels
        return out

    def answer(self, results: list[Result], decoded: list[DecodedImage]) -> list[dict[str, Any]]:
        pred = self.det.decide(np.array([r.score for r in results]), threshold=self.threshold)
        out = []
        for i, (res, img) in enumerate(zip(results, decoded)):
            if not np.isfinite(res.score):
                raise RuntimeError(f"the model produced a non-finite score ({res.score})")
            item = answer_record(pred.record(i), self.det.method)
            if res.map is not None and self.scale is not None:
                amap = upsample_maps([res.map], [heatmap_size(*img.size)])[0]  # (one resize, to what is sent)
                item["heatmap"] = heatmap_png(amap, self.scale)
                item["heatmap_level"], item["heatmap_scale"] = self.scale.level, self.scale.scale
            out.append(item)
        return out

    async def score(self, items: Items, want_maps: bool, client: str = "in-process") -> list[dict[str, Any]]:
        """Score images already read (see ``score_request``)."""
        async def ready() -> tuple[Items, bool]:
            return items, want_maps

        return await self.score_request(ready, client)

    async def score_request(self, read: Callable[[], Awaitable[tuple[Items, bool]]],
                            client: str) -> list[dict[str, Any]]:
        """Count the request against its client's limit (or 429) and score it (``_admit_and_score``); the
        client's count is given back however the request ends (answered, refused, timed out, client gone)."""
        if not self.clients.take(client):
            self.metrics.client_limited.inc()
            raise HTTPException(429, too_many_from(client, self.clients.limit), headers={"Retry-After": "1"})
        try:
            return await self._admit_and_score(read)
        finally:
            self.clients.give_back(client)

    async def _admit_and_score(self, read: Callable[[], Awaitable[tuple[Items, bool]]]) -> list[dict[str, Any]]:
        """Admit (or 503) *before* the body is read, so --queue-size bounds the bodies held in memory;
        then read, decode, run on the worker and encode the answer, all within --timeout-s."""
        worker, settings = self.worker, self.settings
        try:
            worker.admit()
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise HTTPException(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        except WorkerStopped as e:
            raise HTTPException(503, str(e)) from None
        state = {"submitted": False}
        held = Reservation(self.pixels)
        try:
            return await asyncio.wait_for(self._admitted(read, state, held), settings.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"the request did not finish within {settings.timeout_s:g} s (--timeout-s: "
                                     "decoding, inference and encoding together); the server is overloaded "
                                     "or the images are too large") from None
        except WorkerStopped as e:
            raise HTTPException(503, str(e)) from None
        finally:
            held.close()
            if not state["submitted"]:
                worker.release()

    async def _admitted(self, read: Callable[[], Awaitable[tuple[Items, bool]]],
                        state: dict[str, bool], held: Reservation) -> list[dict[str, Any]]:
        items, want_maps = await read()
        decoded = await self.off_loop(self._decode_holding, items, held)
        job = Job([d.pixels for d in decoded], want_maps and self.det.has_maps)
        state["submitted"] = True  # from here the worker owns the slot
        results = await asyncio.wrap_future(self.worker.submit(job))
        if job.want_maps:
            return await self.off_loop(self.answer, results, decoded)
        return self.answer(results, decoded)
