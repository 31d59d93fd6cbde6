"""The app factory: ``create_app(model, settings)`` -> an ASGI app serving one detector.

The event loop only routes (``routes``); JSON parsing, base64 and image decoding and heatmap encoding
run in a small pool of decode threads and the model in the inference worker's thread (``service``).
Every error is a JSON ``{"detail": ...}`` with the right status; no traceback ever reaches a client.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from insightad.apps.serve.limits import BodySizeLimitMiddleware
from insightad.apps.serve.metrics import MetricsMiddleware
from insightad.apps.serve.page import mount_page, served_model_sha256
from insightad.apps.serve.routes import add_routes
from insightad.apps.serve.security import api_key_dependency
from insightad.apps.serve.service import ScoringService
from insightad.apps.serve.settings import ServeParams
from insightad.errors import InsightADError
from insightad.scoring import Scorer
from insightad.version import __version__

log = logging.getLogger("insightad.serve")
CLIENT_CLOSED = 499  # the usual status for "client closed the request" (nginx): a 4xx, never a 500
KEY_NOTE = (" This server needs an API key (`X-API-Key: KEY` or `Authorization: Bearer KEY`; the Authorize "
            "button) on every path but `/health`, the page at `/` and its assets, and these docs.")
PATHS = frozenset({"/infer", "/infer/batch", "/health", "/model", "/metrics"})


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


ENDPOINTS = ("POST /infer", "POST /infer/batch", "GET /health", "GET /model", "GET /metrics", "GET /docs")


def _shown(path: str) -> str:
    return path if len(path) <= 80 else path[:77] + "..."


def no_such_path(method: str, path: str) -> str:
    """What a 404 from the router says: the path, a near one when there is (``/Infer``, ``/infer/btach``), and the
    API's paths; it was 'Not Found', which did not say whether the server, the path or the method was wrong."""
    known = [e.split(" ", 1)[1] for e in ENDPOINTS]
    same = [k for k in known if k.lower() == path.lower().rstrip("/")]
    near = same or difflib.get_close_matches(path, known, 1, 0.75)
    hint = f" (did you mean {near[0]}?" + (" paths are case-sensitive" if same else "") + ")" if near else ""
    return f"{method} {_shown(path)}: no such path on this server{hint}; it answers {', '.join(ENDPOINTS)} and the " \
           "page at /"


def method_not_allowed(method: str, path: str, allow: str) -> str:
    """What a 405 says: the path takes other methods, named (it was 'Method Not Allowed')."""
    return f"{method} {_shown(path)}: method not allowed; expected {allow or 'another method'}" + (
        " (send the image in a POST body)" if path.startswith("/infer") and "POST" in allow else "")


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Location, message and type only: never echo the (possibly huge) input back."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 413:
            headers["Connection"] = "close"  # the rest of the body is never read
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":  # the router's own, to a path it does not know
            detail = no_such_path(request.method, request.scope.get("path", ""))
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            allow = next((v for k, v in headers.items() if k.lower() == "allow"), "")
            detail = method_not_allowed(request.method, request.scope.get("path", ""), allow)
        return _error(exc.status_code, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_errors(exc.errors()))

    @app.exception_handler(InsightADError)
    async def input_error(request: Request, exc: InsightADError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client left before its request was read: not a server error, no traceback, nobody to answer
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return _error(CLIENT_CLOSED, "client closed the connection")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error (details are in the server log)")



class HeadAsGet:
    """HEAD answered as GET without the body (HTTP requires it of every GET resource): FastAPI's routes said 405
    to ``HEAD /health`` and ``HEAD /``, so ``curl -I`` and monitors that probe with HEAD saw a broken server.
    A route without GET still answers 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class ApiPathSlash:
    """``POST /infer/`` answered as ``POST /infer`` (and so for every API path): it was a 307 redirect with an
    empty body, so ``curl -d ... /infer/`` printed nothing and exited 0, and behind a TLS proxy the redirect
    pointed to http://."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if len(path) > 1 and path.endswith("/") and path.rstrip("/") in PATHS:
            raw = scope.get("raw_path")
            scope = {**scope, "path": path.rstrip("/"),
                     **({"raw_path": raw.rstrip(b"/")} if isinstance(raw, bytes) else {})}
        await self.app(scope, receive, send)


def load_detector(model: str | Path | Scorer, settings: ServeParams) -> Scorer:
    """A fitted detector (any Scorer) as given, or a model file loaded on the settings' engine."""
    if isinstance(model, Scorer):
        model._check_fitted()
        return model
    from insightad.inference.load import load_for_inference

    return load_for_inference(model, settings.engine, settings.threads or None, settings.device,
                              arena=settings.memory_arena)


def create_app(model: str | Path | Scorer, settings: ServeParams | None = None,
               threshold: float | None = None) -> FastAPI:
    """An ASGI app serving ``model`` (a model file path or a fitted Detector) with ``settings``."""
    settings = settings or ServeParams()
    det = load_detector(model, settings)
    thr = float(det.threshold_ if threshold is None else threshold)
    if not math.isfinite(thr):
        raise InsightADError(f"threshold: expected a finite number, got {threshold!r}")
    service = ScoringService(det, thr, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        await run_in_threadpool(service.worker.warm_up)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await run_in_threadpool(service.close)

    # /docs from files a dependency ships (no CDN); page.py serves /redoc under a CSP. The docs and the schema
    # need no key (Swagger UI's page loads the schema without one), so with a key they do not name the method:
    # what the model is stays behind the key (GET /model), as documented in docs/serve.md.
    served = "a model (`GET /model` says which)" if settings.api_key is not None else f"a `{det.method}` model"
    app = FastAPIOffline(redoc_url=None, title="InsightAD inference server", version=__version__, lifespan=lifespan,
                  description=f"Visual anomaly detection with {served}. Higher score = more anomalous; `Anomaly` "
                              "(= `anomalous`) is `score > threshold`." + KEY_NOTE * (settings.api_key is not None))
    app.state.service, app.state.worker, app.state.detector = service, service.worker, det
    app.state.settings, app.state.metrics, app.state.threshold, app.state.ready = settings, service.metrics, thr, False
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=int(settings.max_body_mb * 1_000_000),
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, known_paths=PATHS)  # counts 413s
    app.add_middleware(ApiPathSlash)
    app.add_middleware(HeadAsGet)  # outermost
    _add_error_handlers(app)
    service.info["model_sha256"] = served_model_sha256(det)  # threshold and label files carry it
    protected = [Depends(api_key_dependency(settings.api_key))]
    add_routes(app, service, protected)
    mount_page(app, det, service.scale, protected)  # the operators' page at / (page.py)
    return app
