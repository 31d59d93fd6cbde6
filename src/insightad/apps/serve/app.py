"""The FastAPI application: ``create_app(model, settings)`` -> an ASGI app serving one detector.

Routes: ``POST /infer`` (JSON ``{"image": base64}`` or a multipart ``file``), ``POST /infer/batch``,
``GET /health``, ``GET /model``, ``GET /metrics``, OpenAPI docs at ``/docs`` and ``/redoc`` (offline), the
operators' page at ``/`` (``page.py``). The event loop only
routes: JSON parsing, base64 and image decoding, and heatmap encoding run in a small pool of decode
threads, and the model runs in the inference worker's thread. Every error is a JSON ``{"detail": ...}``
with the right status; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from insightad import __version__
from insightad.apps.serve.codec import (DecodedImage, bounded_size, decode_base64, decode_image, heatmap_color_png,
                                        heatmap_png)
from insightad.apps.serve.limits import BodySizeLimitMiddleware
from insightad.apps.serve.metrics import MetricsMiddleware, ServerMetrics
from insightad.apps.serve.page import mount_page, served_model_sha256
from insightad.apps.serve.schemas import (BatchRequest, BatchResponse, ErrorResponse, Health, InferRequest,
                                          InferResponse, ModelInfo)
from insightad.apps.serve.security import api_key_dependency
from insightad.apps.serve.worker import InferenceWorker, Job, QueueFull, Result, WorkerStopped
from insightad.config import ServeParams
from insightad.decide.normalize import normalize_scores
from insightad.errors import InsightADError
from insightad.methods.base import Detector, upsample_maps
from insightad.render.colormap import MapScale

log = logging.getLogger("insightad.serve")

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


# ---------------------------------------------------------------------------------- helpers
def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Location, message and type only: never echo the (possibly huge) input back."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _parse_json(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) from None


def _model_info(det: Detector, threshold: float) -> dict[str, Any]:
    from insightad.model_file import metadata

    meta = getattr(det, "metadata_", None) or metadata(det)
    thr = dict(meta.get("threshold") or {})
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


def _json_body_doc(model: type[BaseModel], multipart: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if multipart:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary", "description": "an image file"},
                           "heatmap": {"type": "boolean", "default": False},
                           "heatmap_style": {"type": "string", "enum": ["gray", "color"], "default": "gray"}}}}
    return {"requestBody": {"required": True, "content": content}}


ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad base64, not an image, truncated image, too many pixels"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    413: {"model": ErrorResponse, "description": "request body over the size limit"},
    422: {"model": ErrorResponse, "description": "invalid JSON or a missing field"},
    503: {"model": ErrorResponse, "description": "inference queue full (retry later) or shutting down"},
}


# ---------------------------------------------------------------------------------- the app
def create_app(model: str | Path | Detector, settings: ServeParams | None = None,
               threshold: float | None = None) -> FastAPI:
    """An ASGI app serving ``model`` (a model file path or a fitted Detector) with ``settings``."""
    settings = settings or ServeParams()
    if isinstance(model, Detector):
        det = model
        det._check_fitted()
    else:
        from insightad.apps.inference import load_for_inference

        det = load_for_inference(model, settings.engine, settings.threads or None, settings.device)
    thr = float(det.threshold_ if threshold is None else threshold)
    if not math.isfinite(thr):
        raise InsightADError(f"threshold: expected a finite number, got {threshold!r}")
    info = _model_info(det, thr)
    info["model_sha256"] = served_model_sha256(det)
    map_scale = MapScale.for_detector(det, thr)
    norm_scale = (getattr(det, "threshold_info_", {}) or {}).get("scale")
    prep = det.preprocessing_
    metrics = ServerMetrics()
    worker = InferenceWorker(det, settings.max_batch, settings.batch_wait_ms, settings.queue_size,
                             settings.threads, on_batch=metrics.observe_batch)
    metrics.watch_queue(lambda: worker.pending)
    max_body = int(settings.max_body_mb * 1_000_000)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # A few threads parse and decode: more would only contend for the cores (and hold more memory).
    io_pool = ThreadPoolExecutor(settings.decode_threads or min(4, cores), thread_name_prefix="insightad-decode")

    async def off_loop(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(io_pool, functools.partial(fn, *args))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        await run_in_threadpool(worker.warm_up)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await run_in_threadpool(worker.stop)
            io_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPIOffline(redoc_url=None, title="InsightAD inference server", version=__version__, lifespan=lifespan,
                  description=f"Visual anomaly detection with a `{det.method}` model. Higher score = more "
                              "anomalous; `Anomaly` is `score > threshold`.")
    app.state.worker, app.state.detector, app.state.settings, app.state.metrics = worker, det, settings, metrics
    app.state.threshold, app.state.ready = thr, False
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body)
    app.add_middleware(MetricsMiddleware, metrics=metrics,  # outermost: counts 413s too
                       known_paths=frozenset({"/infer", "/infer/batch", "/health", "/model", "/metrics"}))
    protected = [Depends(api_key_dependency(settings.api_key))]

    # ------------------------------------------------------------------ error handlers
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 413:
            headers["Connection"] = "close"  # the rest of the body is never read
        return _error(exc.status_code, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_errors(exc.errors()))

    @app.exception_handler(InsightADError)
    async def input_error(request: Request, exc: InsightADError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error (details are in the server log)")

    # ------------------------------------------------------------------ scoring
    def decode_all(items: list[tuple[str, str | bytes]]) -> list[DecodedImage]:
        out = []
        for field, payload in items:
            data = decode_base64(payload, field) if isinstance(payload, str) else payload
            out.append(decode_image(data, prep, settings.max_pixels, field))
        return out

    def answer(results: list[Result], decoded: list[DecodedImage], style: str = "gray") -> list[dict[str, Any]]:
        out = []
        for res, img in zip(results, decoded):
            if not math.isfinite(res.score):
                raise RuntimeError(f"the model produced a non-finite score ({res.score})")
            item: dict[str, Any] = {"Anomaly": res.score > thr, "score": res.score, "threshold": thr,
                                    "method": det.method,
                                    "score_normalized": float(normalize_scores(np.array([res.score]), thr,
                                                                               norm_scale)[0])}
            if res.map is not None and style == "color":
                amap = upsample_maps(res.map[None], [bounded_size(img.size)])[0]
                item["heatmap_color"] = heatmap_color_png(amap, map_scale)
                item["heatmap_level"], item["heatmap_scale"] = map_scale.level, map_scale.scale
            elif res.map is not None:
                amap = upsample_maps(res.map[None], [img.size])[0]
                item["heatmap"], item["heatmap_min"], item["heatmap_max"] = heatmap_png(amap)
            out.append(item)
        return out

    async def score(items: list[tuple[str, str | bytes]], want_maps: bool, style: str = "gray"
                    ) -> list[dict[str, Any]]:
        try:
            worker.admit()
        except QueueFull as e:
            metrics.rejected.inc()
            raise HTTPException(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        except WorkerStopped as e:
            raise HTTPException(503, str(e)) from None
        submitted = False
        try:
            decoded = await off_loop(decode_all, items)
            job = Job([d.tensor for d in decoded], want_maps and det.has_maps)
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
            return await off_loop(answer, results, decoded, style)
        return answer(results, decoded, style)

    async def read_upload(request: Request) -> tuple[bytes, bool, str]:
        form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        try:
            upload = form.get("file")
            if upload is None:
                raise RequestValidationError([{"loc": ("body", "file"), "msg": "Field required", "type": "missing"}])
            if not isinstance(upload, UploadFile):
                raise RequestValidationError([{"loc": ("body", "file"), "type": "file_expected",
                                               "msg": "expected a file upload (multipart field 'file' with a filename)"}])
            data = await upload.read()
            if not data:
                raise InsightADError(f"file: the uploaded file {upload.filename!r} is empty")
            want = str(form.get("heatmap", "false")).strip().lower() in TRUE_WORDS
            style = str(form.get("heatmap_style", "gray")).strip().lower()
            if style not in ("gray", "color"):
                raise RequestValidationError([{"loc": ("body", "heatmap_style"), "type": "literal_error",
                                               "msg": "Input should be 'gray' or 'color'"}])
            return data, want, style
        finally:
            await form.close()

    # ------------------------------------------------------------------ routes
    @app.post("/infer", response_model=InferResponse, response_model_exclude_none=True, dependencies=protected,
              responses=ERRORS_DOC, openapi_extra=_json_body_doc(InferRequest, multipart=True),
              summary="Score one image (JSON with base64, or a multipart upload in field 'file')")
    async def infer(request: Request) -> Any:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            data, want, style = await read_upload(request)
            return (await score([("file", data)], want, style))[0]
        req = await off_loop(_parse_json, InferRequest, await request.body())
        return (await score([("image", req.image)], req.heatmap, req.heatmap_style))[0]

    @app.post("/infer/batch", response_model=BatchResponse, response_model_exclude_none=True,
              dependencies=protected, responses=ERRORS_DOC, openapi_extra=_json_body_doc(BatchRequest, multipart=False),
              summary="Score several images; results in the same order")
    async def infer_batch(request: Request) -> Any:
        req = await off_loop(_parse_json, BatchRequest, await request.body())
        if len(req.images) > settings.max_images:
            raise HTTPException(413, f"images: at most {settings.max_images} images per request (--max-images), "
                                     f"got {len(req.images)}")
        items = [(f"images[{i}]", s) for i, s in enumerate(req.images)]
        return {"results": await score(items, req.heatmap, req.heatmap_style)}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}},
             summary="Liveness and readiness: 200 when the model is loaded and the worker runs")
    async def health() -> Any:
        ok = bool(app.state.ready) and worker.alive
        body = {"status": "ok" if ok else "unavailable", "model_loaded": det.is_fitted, "worker_alive": worker.alive,
                "queue_depth": worker.pending}
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/model", response_model=ModelInfo, dependencies=protected,
             summary="The served model: method, backbone, threshold, preprocessing, versions")
    async def model_info() -> Any:
        return info

    @app.get("/metrics", dependencies=protected, response_class=Response,
             summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    mount_page(app, det, thr, map_scale, protected)  # the operators' page at / (apps/serve/page.py)
    return app
