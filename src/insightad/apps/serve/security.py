"""Optional API key: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; wrong or missing -> 401.

Declared through FastAPI's security helpers so the OpenAPI docs show both schemes (and the docs
page's "Authorize" button works). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from insightad.errors import InsightADError

API_KEY_ENV = "INSIGHTAD_API_KEY"


def check_api_key(key: str, source: str) -> str:
    """``key`` when a client can send it in a header, else a one-line error naming ``source`` (the flag or the
    variable). HTTP strips spaces and line breaks from both ends of a header value, and browsers send nothing
    outside Latin-1: a key read from a file with its newline, or one with an accented letter, was refused to
    every client as 'wrong API key'."""
    if key != key.strip():
        raise InsightADError(f"{source}: the key starts or ends with a space or line break, which no HTTP header "
                             "can carry; expected the key alone")
    if not all(" " <= c <= "~" for c in key):
        raise InsightADError(f"{source}: expected printable ASCII characters (letters, digits, punctuation), which "
                             "every HTTP client can send; got a control or non-ASCII character")
    return key


_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
_bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "x-api-key"})


def query_key_note(request: Request) -> str:
    """What to add to 'missing API key' when the URL's query string holds something named like a key: it is not
    read there (URLs end up in access logs and browser history), and 'missing' alone said the client sent none."""
    if any(name.lower() in QUERY_KEY_NAMES for name in request.query_params):
        return " (a key in the URL's query string is not read: URLs end up in logs)"
    return ""


def authorization_note(request: Request) -> str:
    """What to add to 'missing API key' when an Authorization header came that is not ``Bearer KEY`` (``Basic``
    from ``curl -u``, ``Token KEY``, the key alone): it is not read, and 'missing' alone said none was sent.
    Nothing of the header is echoed back (it may hold the key)."""
    auth = request.headers.get("authorization", "").strip()
    if not auth:
        return ""
    parts = auth.split(None, 1)
    if parts[0].lower() == "bearer":
        return " (the Authorization header says 'Bearer' but holds no key)" if len(parts) == 1 else ""
    return " (an Authorization header is read only as 'Bearer KEY'; the one sent has another or no scheme)"


def api_key_dependency(expected: str | None) -> Callable[..., Awaitable[None]]:
    """A dependency that lets every request through when ``expected`` is None, else checks the key."""

    async def check(request: Request, header_key: str | None = Security(_header),
                    bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
        if expected is None:
            return
        given = [k for k in (header_key, bearer.credentials if bearer else None) if k]
        if not any(hmac.compare_digest(k.encode(), expected.encode()) for k in given):
            what = "wrong API key" if given else "missing API key" + (authorization_note(request)
                                                                        or query_key_note(request))
            raise HTTPException(401, f"{what}: send it in the X-API-Key header or as 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check
