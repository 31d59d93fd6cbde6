"""Prometheus metrics (prometheus_client): requests, latency, errors, queue and batch sizes.

Each app gets its own registry, so several apps in one process (tests) never share counters.
Endpoints are labelled by route template, never by raw path, so label cardinality stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServerMetrics:
    """The metric families the server exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, fds
        r = self.registry
        self.requests = Counter("insightad_requests_total", "HTTP requests answered",
                                ("method", "endpoint", "status"), registry=r)
        self.latency = Histogram("insightad_request_duration_seconds", "time from request to the end of "
                                 "the response", ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("insightad_request_errors_total", "requests answered with a 4xx or 5xx status",
                              ("endpoint", "status"), registry=r)
        self.images = Counter("insightad_images_scored_total", "images scored by the model", registry=r)
        self.batch_size = Histogram("insightad_batch_size", "images per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("insightad_batch_duration_seconds", "time of one forward pass",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("insightad_rejected_total", "requests refused with 503 because the inference "
                                "queue was full", registry=r)
        self.client_limited = Counter("insightad_client_limited_total", "requests refused with 429 because their "
                                      "client already had --max-requests-per-client open", registry=r)
        self.queue_depth = Gauge("insightad_queue_depth", "requests admitted and waiting for inference",
                                 registry=r)

    def observe_batch(self, n: int, seconds: float) -> None:
        self.images.inc(n)
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_template(scope: Scope, known: frozenset[str] = frozenset()) -> str:
    """The matched route's path template (bounded label values). Requests refused before routing
    (413 on Content-Length) keep their path when it is one of ``known``; anything else is 'other'."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    return scope.get("path", "") if scope.get("path") in known else "other"


class MetricsMiddleware:
    """Count and time every HTTP request, from its first byte to the end of its response."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, known_paths: frozenset[str] = frozenset()) -> None:
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = route_template(scope, self.known)
            m = self.metrics
            method = scope.get("method", "")
            m.requests.labels(method if method in HTTP_METHODS else "other", endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status >= 400:
                m.errors.labels(endpoint, str(status)).inc()
