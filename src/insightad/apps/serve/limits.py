"""Request-body size limit: 413 before the body is read whole.

A declared ``Content-Length`` over the limit is answered from the header, before routing and decoding
(a body up to ``DRAIN_MAX_BYTES`` is read and dropped first, so that a client sending all of it before
reading sees the 413; a larger one is not read). Bodies without one (chunked uploads), or that send more than they declared,
are counted as they stream in and stopped by ``BodyTooLarge`` (an HTTPException, so FastAPI's own
body parsing passes it through) the moment they cross the limit.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def describe_limit(limit: int) -> str:
    return f"{limit / 1e6:g} MB ({limit} bytes; --max-body-mb)"


DRAIN_MAX_BYTES = 256 * 1024 * 1024  # over-limit bodies up to this size are read and dropped before the 413


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, size: int | None = None) -> None:
        got = f"{size} bytes" if size is not None else f"more than {describe_limit(limit)} (a chunked body, cut off)"
        super().__init__(413, f"request body too large: {got}; this server accepts at most {describe_limit(limit)}")


class BodyTimeout(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"request body not received within {timeout_s:g} s (--body-timeout-s)",
                         headers={"Connection": "close"})


def waits_for_continue(headers: Headers) -> bool:
    """Whether the client sent ``Expect: 100-continue`` and waits to be told to send its body: reading the body
    makes uvicorn answer '100 Continue', which told curl (it asks so for uploads over 1 MB) to send an image
    the server had already refused by its Content-Length."""
    return headers.get("expect", "").strip().lower() == "100-continue"


class BodySizeLimitMiddleware:
    """Refuse HTTP request bodies larger than ``max_bytes`` with 413 and a JSON message."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the body (a chunk at a time, within the body deadline): closing a connection
        with unread data resets it, and the client would see a reset instead of the 413."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while (left := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                await JSONResponse({"detail": "invalid Content-Length header"}, 400,
                                   headers={"Connection": "close"})(scope, receive, send)
                return
            if size > self.max_bytes:
                if size <= DRAIN_MAX_BYTES and not waits_for_continue(headers):
                    await self._drain(receive)  # a client that sends its whole body first can then read the 413
                await JSONResponse({"detail": BodyTooLarge(self.max_bytes, size).detail}, 413,
                                   headers={"Connection": "close"})(scope, receive, send)
                return

        received = 0
        started = False
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as e:  # raised outside a route's error handling (should be rare)
            if started:
                raise
            await JSONResponse({"detail": e.detail}, e.status_code,
                               headers={"Connection": "close"})(scope, receive, send)
