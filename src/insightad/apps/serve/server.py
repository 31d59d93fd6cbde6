"""The uvicorn server around the app: ``uvicorn_config(app, settings, ...)``, the one place its options are set.

uvicorn's HTTP/1.1 protocol times out only the idle gap *after* a response (keep-alive). A connection that
never sends a request, or sends its head a byte at a time, was held for ever, and every held connection
takes one of ``--max-connections`` slots: 256 idle sockets from one client made the server answer 503 to
everyone else for as long as they stayed open. ``HeadTimeoutProtocol`` closes a connection whose request
head (request line and headers) is not whole ``--head-timeout-s`` after the connection opened or after the
previous answer; the body has its own deadline (``--body-timeout-s``, ``limits``).

Over ``--max-connections`` uvicorn answered 503 in plain text ("Service Unavailable"), and a request that
is not valid HTTP/1.1 400 in plain text: the protocol answers both as every other error, ``{"detail": ...}``
saying what was expected (the 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from insightad.apps.serve.settings import ServeParams
from insightad.errors import InsightADError

log = logging.getLogger("insightad.serve")


def too_many_connections(limit: int) -> Any:
    """The ASGI app that answers a request over the connection limit: 503, JSON, ``Retry-After: 1``."""
    body = json.dumps({"detail": f"server busy: {limit} connections and requests already open "
                                 "(--max-connections); retry shortly"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1"), (b"connection", b"close")]

    async def busy(scope: Any, receive: Any, send: Any) -> None:
        log.warning("refused %s %s: %d connections and requests already open (--max-connections)",
                    scope.get("method"), scope.get("path"), limit)
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return busy


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline on each request head (``head_timeout_s``) and a JSON answer
    over the connection limit (uvicorn's ``limit_concurrency``, checked here instead, as uvicorn does)."""

    head_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limit, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's own check: plain text
        self._app, self._busy = self.app, too_many_connections(self._limit or 0)

    def handle_events(self) -> None:
        """Parse what has arrived; a request head parsed here runs the app, or the JSON 503 when the server
        already holds ``limit`` connections or requests (the test uvicorn makes at the same point)."""
        limit = self._limit
        over = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
        self.app = self._busy if over else self._app
        super().handle_events()

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.logger.info("closed a connection that sent no whole request head within %g s (--head-timeout-s)",
                             self.head_timeout_s)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request that is not valid HTTP/1.1 (h11 refused its head or framing): uvicorn answered it with a
        plain-text 'Invalid HTTP request received.'; this answers as every other error, in JSON, saying what
        was expected."""
        body = json.dumps({"detail": f"{msg.rstrip('.')}: expected a well-formed HTTP/1.1 request (one request "
                                     "line, headers under 64 kB, one Content-Length or Transfer-Encoding: "
                                     "chunked)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_for_head():  # the head is whole: the request runs (its body has its own deadline)
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting_for_head():  # (a pipelined request already parsed needs no deadline)
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def trusted_proxies(value: str | None) -> str | None:
    """``--trusted-proxies`` checked and tidied (comma-separated addresses or networks), or None when unset; one
    line naming the entry that is neither, before the model loads."""
    import ipaddress

    if value is None:
        return None
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        raise InsightADError("--trusted-proxies: empty; give the proxies' addresses (e.g. 127.0.0.1 or 10.0.0.0/8) "
                             "or leave the flag out")
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise InsightADError(f"--trusted-proxies: {entry[:60]!r} is not an IP address or network (expected e.g. "
                                 "127.0.0.1, ::1 or 10.0.0.0/8, comma-separated)") from None
    return ",".join(entries)


def uvicorn_config(app: Any, settings: ServeParams, log_level: str = "info", ssl_certfile: str | None = None,
                   ssl_keyfile: str | None = None) -> uvicorn.Config:
    """The server's uvicorn options: connections beyond ``max_connections`` get 503 from uvicorn itself (no
    traceback each), a request head must arrive within ``head_timeout_s``, idle keep-alive connections are
    closed after a few seconds, and h11 caps the size of the request head. X-Forwarded-For is read only on
    connections from ``--trusted-proxies``: uvicorn's default trusted it from 127.0.0.1, so any local process
    could pick the address it liked, and the per-client limit (--max-requests-per-client) counts that address."""
    proxies = trusted_proxies(settings.trusted_proxies)
    protocol = type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": settings.head_timeout_s})
    return uvicorn.Config(app, log_level=log_level, access_log=settings.access_log, server_header=False,
                          timeout_graceful_shutdown=10, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                          limit_concurrency=settings.max_connections, timeout_keep_alive=5, http=protocol,
                          h11_max_incomplete_event_size=64 * 1024, proxy_headers=proxies is not None,
                          forwarded_allow_ips=proxies)
