"""Request-body size limit: 413 before the body is read whole.

A declared ``Content-Length`` over the limit is answered at once, before routing and before a byte
of the body is read. Bodies without one (chunked uploads), or that send more than they declared,
are counted as they stream in and stopped by ``BodyTooLarge`` (an HTTPException, so FastAPI's own
body parsing passes it through) the moment they cross the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def describe_limit(limit: int) -> str:
    return f"{limit / 1e6:g} MB ({limit} bytes; --max-body-mb)"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, size: int | None = None) -> None:
        got = f"{size} bytes" if size is not None else "more"
        super().__init__(413, f"request body too large: {got}; this server accepts at most {describe_limit(limit)}")


class BodySizeLimitMiddleware:
    """Refuse HTTP request bodies larger than ``max_bytes`` with 413 and a JSON message."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
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
                await JSONResponse({"detail": BodyTooLarge(self.max_bytes, size).detail}, 413,
                                   headers={"Connection": "close"})(scope, receive, send)
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
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
        except BodyTooLarge as e:  # raised outside a route's error handling (should be rare)
            if started:
                raise
            await JSONResponse({"detail": e.detail}, 413, headers={"Connection": "close"})(scope, receive, send)
