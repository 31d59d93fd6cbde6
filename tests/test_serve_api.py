"""The HTTP API through FastAPI's test client: the /infer contract, every bad input, API key, heatmaps."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.config import DetectorParams
from insightad.data.preprocess import Preprocessing
from insightad.data.synthetic import make_image
from insightad.inference.load import load_for_inference
from insightad.methods import register_method, unregister_method
from insightad.methods.base import Detector
from insightad.model_file import load_model, save_model
from insightad.render.colormap import MapScale, colorize

# intended change (architecture issue): + anomalous, score_normalized
RESPONSE_KEYS = {"Anomaly", "anomalous", "score", "score_normalized", "threshold", "method"}
MAP_SIZE = 64  # working size of the test-only map method


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    good, _ = make_image("disc", None, size=96, seed=11)
    bad, _ = make_image("disc", "blob", size=96, seed=12)
    wide, _ = make_image("disc", "scratch", size=120, seed=13)
    return {"good": png_bytes(good), "bad": png_bytes(bad), "wide": png_bytes(wide.resize((150, 90))),
            "jpeg": png_bytes(good, "JPEG")}


@pytest.fixture(scope="module")
def client(baseline_model):
    with TestClient(create_app(baseline_model, ServeParams(max_body_mb=1.0, max_images=3, max_pixels=200_000))) as c:
        yield c


# ------------------------------------------------------------------------------ the contract
def test_infer_json_contract(client, images, baseline_model):
    det = load_for_inference(baseline_model)
    r = client.post("/infer", json={"image": b64(images["bad"])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == RESPONSE_KEYS
    assert isinstance(body["Anomaly"], bool) and isinstance(body["score"], float)
    assert body["method"] == "baseline" and body["threshold"] == pytest.approx(det.threshold_)
    assert body["Anomaly"] == (body["score"] > body["threshold"])
    expected = det.predict([images["bad"]], maps=False).scores[0]  # same bytes, same preprocessing
    assert body["score"] == pytest.approx(expected, rel=1e-6)


def test_infer_accepts_any_size_format_and_base64_variants(client, images):
    scores = {}
    for name in ("good", "wide", "jpeg"):
        r = client.post("/infer", json={"image": b64(images[name])})
        assert r.status_code == 200, r.text
        scores[name] = r.json()["score"]
    raw = b64(images["good"])
    wrapped = "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))  # MIME line breaks
    variants = [wrapped, "data:image/png;base64," + raw, raw.rstrip("="),
                base64.urlsafe_b64encode(images["good"]).decode()]
    for text in variants:
        r = client.post("/infer", json={"image": text})
        assert r.status_code == 200, r.text
        assert r.json()["score"] == scores["good"]


def test_multipart_upload_equals_json(client, images):
    a = client.post("/infer", json={"image": b64(images["bad"])}).json()
    b = client.post("/infer", files={"file": ("part.png", images["bad"], "image/png")})
    assert b.status_code == 200, b.text
    assert b.json() == a


def test_batch_keeps_order_and_limits_count(client, images):
    singles = [client.post("/infer", json={"image": b64(images[k])}).json()["score"] for k in ("good", "bad", "wide")]
    r = client.post("/infer/batch", json={"images": [b64(images[k]) for k in ("good", "bad", "wide")]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [set(x) for x in results] == [RESPONSE_KEYS] * 3
    assert [x["score"] for x in results] == pytest.approx(singles, rel=1e-4)
    assert singles[0] != singles[1]  # order really checked
    r = client.post("/infer/batch", json={"images": [b64(images["good"])] * 4})
    assert r.status_code == 413 and "at most 3 images" in r.json()["detail"]
    assert client.post("/infer/batch", json={"images": []}).status_code == 422
    r = client.post("/infer/batch", json={"images": [b64(images["good"]), "%%%"]})
    assert r.status_code == 400 and r.json()["detail"].startswith("images[1]: not valid base64")


def test_heatmap_flag_ignored_for_image_level_methods(client, images):
    r = client.post("/infer", json={"image": b64(images["good"]), "heatmap": True})
    assert r.status_code == 200 and set(r.json()) == RESPONSE_KEYS


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("body, field", [
    (b"{", "body"),                          # invalid JSON
    (b"not json at all", "body"),
    (b"{}", "image"),                         # missing field
    (b'{"picture": "abc"}', "image"),
    (b'{"image": 123}', "image"),             # wrong type
    (b'["image"]', "body"),
])
def test_invalid_json_or_missing_field_is_422(client, body, field):
    r = client.post("/infer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail and detail[0]["loc"][0] == "body"
    assert field == "body" or detail[0]["loc"] == ["body", field]
    assert "input" not in detail[0]  # the request is never echoed back


def _bomb_png() -> bytes:
    """A 2000x2000 PNG (4 M pixels) that compresses to a few kB: over the test server's 200k-pixel limit."""
    return png_bytes(Image.new("L", (2000, 2000)))


@pytest.mark.parametrize("payload, message", [
    ("!!!not base64!!!", "image: not valid base64"),
    ("", "image: empty"),
    ("    ", "image: empty"),
    (b64(b"hello, this is not an image"), "image: not a readable image"),
    ("TRUNCATED", "image: unreadable or truncated image"),
    ("BOMB", "image: image has 4000000 pixels, over this server's limit of 200000"),
])
def test_bad_images_are_400_with_a_message(client, images, payload, message):
    if payload == "TRUNCATED":
        payload = b64(images["bad"][: len(images["bad"]) // 2])
    elif payload == "BOMB":
        payload = b64(_bomb_png())
    r = client.post("/infer", json={"image": payload})
    assert r.status_code == 400
    assert r.json()["detail"].startswith(message), r.json()
    assert "Traceback" not in r.text


def test_bad_multipart_uploads(client, images):
    r = client.post("/infer", files={"other": ("x.png", images["good"], "image/png")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    r = client.post("/infer", data={"file": "just text"}, files={"dummy": ("d.txt", b"x", "text/plain")})
    assert r.status_code == 422 and "file upload" in r.json()["detail"][0]["msg"]
    r = client.post("/infer", files={"file": ("x.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/infer", files={"file": ("x.png", b"GIF89a garbage", "image/png")})
    assert r.status_code == 400 and r.json()["detail"].startswith("file: not a readable image")


def test_body_over_limit_is_413(client, images):
    big = json.dumps({"image": b64(b"\0" * 900_000)})  # ~1.2 MB > 1 MB limit, declared in Content-Length
    r = client.post("/infer", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "at most 1 MB" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b"A" * 50_000

    r = client.post("/infer", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post("/infer", files={"file": ("x.png", b"\0" * 1_100_000, "image/png")})
    assert r.status_code == 413
    text = client.get("/metrics").text
    assert 'insightad_request_errors_total{endpoint="/infer",status="413"} 3.0' in text


def test_wrong_verb_405_unknown_path_404(client):
    assert client.get("/infer").status_code == 405
    assert client.put("/infer/batch", json={}).status_code == 405
    assert client.post("/health").status_code == 405
    assert client.get("/nope").status_code == 404


def test_internal_errors_never_leak(baseline_model, images):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("secret detail /internal/path")

    det = load_model(baseline_model)
    app = create_app(det)
    det.model_ = Broken()  # after create_app; warm-up would fail otherwise
    app.state.worker.warm_up = lambda: None
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/infer", json={"image": b64(images["good"])})
        assert r.status_code == 500
        assert "secret" not in r.text and "Traceback" not in r.text and "internal server error" in r.json()["detail"]
        assert c.get("/health").status_code == 200  # the worker survived


# ------------------------------------------------------------------------------ other routes
def test_health_model_metrics_docs(client, images, baseline_model):
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model_loaded"] is True
    m = client.get("/model").json()
    assert m["method"] == "baseline" and m["has_maps"] is False
    assert m["backbone"]["name"] == "tf_efficientnet_lite0"
    assert m["threshold"]["value"] == pytest.approx(load_model(baseline_model).threshold_)
    assert m["version"]["insightad"] and m["preprocessing"]["size"] == list(load_model(baseline_model).preprocessing_.size)
    client.post("/infer", json={"image": "@@"})
    text = client.get("/metrics").text
    assert 'insightad_requests_total{endpoint="/infer",method="POST",status="200"}' in text
    assert 'insightad_request_errors_total{endpoint="/infer",status="400"}' in text
    assert "insightad_request_duration_seconds_bucket" in text and "insightad_images_scored_total" in text
    assert "process_resident_memory_bytes" in text
    spec = client.get("/openapi.json").json()
    assert {"/infer", "/infer/batch", "/health", "/model", "/metrics"} <= set(spec["paths"])
    assert set(spec["paths"]["/infer"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert client.get("/docs").status_code == 200


def test_threshold_override(baseline_model, images):
    with TestClient(create_app(baseline_model, threshold=-1.0)) as c:
        body = c.post("/infer", json={"image": b64(images["good"])}).json()
        assert body["threshold"] == -1.0 and body["Anomaly"] is True
        assert c.get("/model").json()["threshold"]["strategy"].startswith("override")


# ------------------------------------------------------------------------------ API key
def test_api_key(baseline_model, images):
    with TestClient(create_app(baseline_model, ServeParams(api_key="s3cret"))) as c:
        payload = {"image": b64(images["good"])}
        r = c.post("/infer", json=payload)
        assert r.status_code == 401 and "missing API key" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/infer", json=payload, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "wrong API key" in r.json()["detail"]
        assert c.post("/infer", json=payload, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/infer", json=payload, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/infer", json=payload, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/infer", content=b"{", headers={"X-API-Key": "s3cret"}).status_code == 422
        assert c.post("/infer", content=b"{").status_code == 401  # key checked before the body
        assert c.post("/infer/batch", json={"images": [payload["image"]]}).status_code == 401
        for path in ("/model", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


# ------------------------------------------------------------------------------ maps
class MeanDiffModel(nn.Module):
    """Test-only map method: per-pixel absolute deviation from the mean training image."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = (x.float() - self.mean).abs().mean(1)
        return d.flatten(1).amax(1), d


class MeanDiffDetector(DetectorParams, Detector):
    has_maps = True
    uses_backbone = False

    def _fit(self, images, progress):
        self.preprocessing_ = Preprocessing(size=(self.image_size, self.image_size))
        x = torch.cat([b.images for b in self._batches(images, progress, "fit")])
        self.model_ = MeanDiffModel(x.float().mean(0))
        self.decision_scores_, self.decision_source_ = self.model_(x)[0].numpy(), "train"
        self.threshold_percentile = 100.0

    def _restore(self, tensors, state):
        return MeanDiffModel(torch.empty_like(tensors["mean"]))


@pytest.fixture(scope="module")
def map_model(tmp_path_factory):
    register_method("test_meandiff")(MeanDiffDetector)
    try:
        train = [make_image("disc", None, size=96, seed=100 + i)[0] for i in range(12)]
        det = MeanDiffDetector(image_size=MAP_SIZE, device="cpu").fit(train)
        path = save_model(det, tmp_path_factory.mktemp("maps") / "meandiff.safetensors")
        yield path
    finally:
        unregister_method("test_meandiff")


def test_heatmap_for_map_methods(map_model):
    img, mask = make_image("disc", "blob", size=96, seed=7)
    img = img.resize((120, 80))  # not square, not model size: the map must come back at 120x80
    mask = np.asarray(Image.fromarray(mask).resize((120, 80))) > 0
    data = png_bytes(img)
    det = load_for_inference(map_model)
    with TestClient(create_app(map_model)) as c:
        assert c.get("/model").json()["has_maps"] is True
        plain = c.post("/infer", json={"image": b64(data)}).json()
        assert set(plain) == RESPONSE_KEYS
        body = c.post("/infer", json={"image": b64(data), "heatmap": True}).json()
        upload = c.post("/infer", files={"file": ("d.png", data, "image/png")}, data={"heatmap": "true"}).json()
        batch = c.post("/infer/batch", json={"images": [b64(data)] * 2, "heatmap": True}).json()["results"]
    assert body["score"] == plain["score"] and body["method"] == "test_meandiff"
    for item in (upload, *batch):
        assert item["heatmap"] == body["heatmap"]
    # Intended change (architecture issue): the heatmap is an RGB PNG in the one colour convention.
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap"])))
    assert heat.format == "PNG" and heat.mode == "RGBA" and heat.size == (120, 80)
    ref = det.predict([data]).maps[0]
    assert ref.shape == (80, 120)
    scale = MapScale(body["heatmap_level"], body["heatmap_scale"])
    assert np.array_equal(np.asarray(heat), colorize(ref, scale, alpha=True))
    decoded = scale.unit(ref)
    assert decoded[mask].mean() > 2 * decoded[~mask].mean()  # the defect is where the map is bright
