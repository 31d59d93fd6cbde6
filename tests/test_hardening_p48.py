"""A second adversarial pass over ``insightad serve``: ambiguous requests, API keys no client can send, TLS
keys, truncated uploads and the operators' page.

Each test failed before its fix and passes after it."""

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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def client(baseline_model):
    with TestClient(create_app(baseline_model, ServeParams())) as c:
        yield c


def _post_json(client: TestClient, path: str, body: bytes):
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path, body, field", [
    ("/infer", b'{"image": "%(a)s", "image": "%(b)s"}', "image"),
    ("/infer", b'{"image": "%(a)s", "\\u0069mage": "%(b)s"}', "image"),  # the same key, spelled with an escape
    ("/infer", b'{"image": "%(a)s", "heatmap": true, "heatmap": false}', "heatmap"),
    ("/infer/batch", b'{"images": ["%(a)s"], "images": ["%(b)s"]}', "images"),
])
def test_a_field_given_twice_in_json_is_refused_not_guessed(client, path, body, field):
    """``{"image": A, "image": B}`` was scored as B (the last copy), while a proxy or log in front may read A."""
    r = _post_json(client, path, body % {b"a": _b64(_png(1)).encode(), b"b": _b64(_png(2)).encode()})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", field], "type": "duplicate_key",
                                   "msg": "given more than once; expected once (JSON readers disagree on which "
                                          "copy counts)"}]


def test_json_with_escapes_and_huge_numbers_but_no_repeated_field_is_scored(client):
    one = _post_json(client, "/infer", b'{"image": "%s"}' % _b64(_png(1)).encode())
    odd = _post_json(client, "/infer", b'{"\\u0069mage": "%s", "note": "caf\\u00e9", "n": %s, "image2": 1}'
                     % (_b64(_png(1)).encode(), b"9" * 4000))
    assert one.status_code == odd.status_code == 200, odd.text
    assert odd.json()["score"] == one.json()["score"]


def test_a_heatmap_form_field_given_twice_is_refused(client):
    r = client.post("/infer", files=[("file", ("a.png", _png(1), "image/png")), ("heatmap", (None, "true")),
                                     ("heatmap", (None, "false"))])
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "heatmap"]
    assert "more than once" in r.json()["detail"][0]["msg"]
