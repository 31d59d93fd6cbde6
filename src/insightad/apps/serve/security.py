"""Optional API key: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; wrong or missing -> 401.

Declared through FastAPI's security helpers so the OpenAPI docs show both schemes (and the docs
page's "Authorize" button works). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

API_KEY_ENV = "INSIGHTAD_API_KEY"

_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
_bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


def api_key_dependency(expected: str | None) -> Callable[..., Awaitable[None]]:
    """A dependency that lets every request through when ``expected`` is None, else checks the key."""

    async def check(header_key: str | None = Security(_header),
                    bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
        if expected is None:
            return
        given = [k for k in (header_key, bearer.credentials if bearer else None) if k]
        if not any(hmac.compare_digest(k.encode(), expected.encode()) for k in given):
            what = "wrong API key" if given else "missing API key"
            raise HTTPException(401, f"{what}: send it in the X-API-Key header or as 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check
