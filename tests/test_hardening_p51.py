"""Hardening p51: the HTTP server and the operators' page.

Covered: a JSON string with a lone surrogate escape (``"\\ud800"``) or another bad escape was 'Invalid JSON:
unexpected end of hex escape' (or 'lone leading surrogate' for a trailing one), which did not say what was wrong.
``Content-Type: text/json`` (and application/x-json) was refused with 415 while application/*+json was read.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams


def _png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


B64 = base64.b64encode(_png()).decode("ascii").encode()


@pytest.fixture(scope="module")
def client(baseline_model):
    with TestClient(create_app(baseline_model, ServeParams())) as c:
        yield c


def _post_json(client: TestClient, path: str, body: bytes, ctype: str = "application/json"):
    return client.post(path, content=body, headers={"Content-Type": ctype})


# ----------------------------------------------------------------------------- bad escapes
@pytest.mark.parametrize("body, loc, words", [
    (b'{"image": "\\ud800"}', ["body", "image"], ["'\\ud800'", "lone UTF-16 surrogate", "line 1 column 12",
                                                 "followed at once by a \\udc00-\\udfff"]),
    (b'{"image": "\\udc00abc"}', ["body", "image"], ["'\\udc00'", "lone UTF-16 surrogate", "second half"]),
    (b'{"image": "\\ud800\\u0041"}', ["body", "image"], ["'\\ud800'", "lone UTF-16 surrogate"]),
    (b'{"image": "%(b)s",\n "note": "x \\"y\\" \\ud800"}', ["body", "note"], ["'\\ud800'", "line 2 column 19",
                                                                           "in the value of 'note'"]),
    (b'{"image": "\\u00e"}', ["body", "image"], ["'\\u00e'", "needs 4 hex digits"]),
    (b'{"image": "\\x41"}', ["body", "image"], ["'\\x'", "not a JSON escape"]),
])
def test_a_bad_escape_says_what_is_wrong_and_where(client, body, loc, words):
    r = _post_json(client, "/infer", body % {b"b": B64})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == loc and err["type"] == "json_invalid"
    assert "hex escape" not in err["msg"] and "leading surrogate" not in err["msg"]
    for w in words:
        assert w in err["msg"], err["msg"]


def test_a_bad_escape_in_a_batch_says_where(client):
    r = _post_json(client, "/infer/batch", b'{"images": ["%s", "\\ud800"]}' % B64)
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert "lone UTF-16 surrogate" in err["msg"] and f"column {len(B64) + 18}" in err["msg"], err["msg"]


def test_a_surrogate_pair_and_other_escapes_are_still_read(client):
    r = _post_json(client, "/infer", b'{"image": "%s", "note": "\\ud83d\\ude00 \\u00e9 \\" \\\\ \\/ \\n"}' % B64)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["Anomaly"], bool)


# ----------------------------------------------------------------------------- JSON media types
@pytest.mark.parametrize("ctype", ["text/json", "Text/JSON; charset=utf-8", "application/x-json", "text/x-json",
                                   "application/vnd.api+json", "application/json"])
@pytest.mark.parametrize("path", ["/infer", "/infer/batch"])
def test_every_name_for_json_is_read_as_json(client, path, ctype):
    """``Content-Type: text/json`` was refused with 415 while ``application/*+json`` was read."""
    body = b'{"image": "%s"}' % B64 if path == "/infer" else b'{"images": ["%s"]}' % B64
    r = _post_json(client, path, body, ctype)
    assert r.status_code == 200, r.text
    answer = r.json() if path == "/infer" else r.json()["results"][0]
    assert isinstance(answer["Anomaly"], bool)


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "text/jsonx", "application/octet-stream"])
def test_other_types_are_still_refused_naming_the_type(client, ctype):
    r = _post_json(client, "/infer", b'{"image": "%s"}' % B64, ctype)
    assert r.status_code == 415
    assert r.json()["detail"].startswith(f"Content-Type {ctype!r}: expected application/json")
