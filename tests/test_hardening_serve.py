"""Issue 12 hardening, server side (points 15-20 and shutdown): admission before the body, bounded
pixels per request, one deadline over the whole request, JSON refusals, no paths on /model, client
disconnects that are not server errors, and an empty API key from the environment."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.cli import main
from insightad.data.synthetic import make_image
from tests.test_serve_api import b64, png_bytes
from tests.test_serve_http import running


@pytest.fixture(scope="module")
def image() -> bytes:
    img, _ = make_image("disc", None, size=96, seed=7)
    return png_bytes(img)


def test_p17_admission_before_body_is_read(baseline_model):
    app = create_app(baseline_model, ServeParams(queue_size=1))
    with TestClient(app) as c:
        app.state.worker.admit()  # the one slot is taken
        try:
            r = c.post("/infer", content=b"{not json at all", headers={"Content-Type": "application/json"})
        finally:
            app.state.worker.release()
    assert r.status_code == 503 and "busy" in r.json()["detail"]  # refused before parsing (else 422)


def test_p15_pixels_bounded_per_request(baseline_model, image):
    with TestClient(create_app(baseline_model, ServeParams(max_pixels=96 * 96 * 2))) as c:
        assert c.post("/infer/batch", json={"images": [b64(image)] * 2}).status_code == 200
        r = c.post("/infer/batch", json={"images": [b64(image)] * 3})
    assert r.status_code == 413 and "per request" in r.json()["detail"]


def test_p15_deadline_covers_decoding(baseline_model, image):
    app = create_app(baseline_model, ServeParams(timeout_s=0.3))
    service = app.state.service
    decode = service.decode_all

    def slow(items):
        time.sleep(1.0)
        return decode(items)

    service.decode_all = slow
    with TestClient(app) as c:
        r = c.post("/infer", json={"image": b64(image)})
    assert r.status_code == 503 and "decoding" in r.json()["detail"]


def test_p18_empty_api_key_from_environment_is_refused(baseline_model, monkeypatch, capsys):
    monkeypatch.setenv("INSIGHTAD_API_KEY", "")
    assert main(["serve", "--model", str(baseline_model), "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert "INSIGHTAD_API_KEY" in err and "empty" in err


def test_p19_model_shows_no_paths_or_image_names(baseline_model, mvtec_dir, tmp_path):
    from insightad.model_file import read_metadata, update_metadata

    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    thr = read_metadata(model)["threshold"]
    details = {**thr.get("details", {}), "data": str(mvtec_dir), "images": ["test/good/000.png"], "n_normal": 8,
               "warnings": [f"these are the images 'insightad evaluate' scores on {mvtec_dir}"]}
    update_metadata(model, threshold={**thr, "details": details})  # what calibrate stores
    with TestClient(create_app(model)) as c:
        body = c.get("/model").json()
    text = json.dumps(body)
    assert str(mvtec_dir) not in text and str(tmp_path) not in text and "000.png" not in text
    assert "images" not in body["threshold"].get("details", {})
    assert body["method"] == "baseline" and body["threshold"]["value"] > 0 and body["version"]["insightad"]


def test_p19_client_disconnect_is_not_a_500(baseline_model, caplog):
    app = create_app(baseline_model)
    with TestClient(app) as c:
        sent: list[dict] = []

        async def call() -> None:
            scope = {"type": "http", "method": "POST", "path": "/infer", "raw_path": b"/infer", "query_string": b"",
                     "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
                     "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                     "root_path": "", "app": app}

            async def receive() -> dict:
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                sent.append(message)

            await app(scope, receive, send)

        c.portal.call(call)
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_p20_refusals_are_json(baseline_model):
    with TestClient(create_app(baseline_model)) as c:
        r = c.post("/infer", content=b'{"image": "x"}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["detail"]
        r = c.post("/infer", content=b"{}", headers={"Content-Type": "application/json", "Content-Length": "-1"})
        assert r.status_code == 400 and "Content-Length" in r.json()["detail"]


def test_p20_oversized_body_via_urllib_gets_readable_413(baseline_model):
    app = create_app(baseline_model, ServeParams(max_body_mb=1.0))
    with running(app) as url:
        body = b'{"image": "' + b"A" * (16 * 1024 * 1024) + b'"}'
        req = urllib.request.Request(f"{url}/infer", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and "too large" in json.loads(e.value.read())["detail"]


def test_p16_slow_body_times_out_with_json(baseline_model):
    import socket

    app = create_app(baseline_model, ServeParams(body_timeout_s=0.5))
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"image\": ")  # and then nothing more
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in data


def test_shutdown_finishes_requests_in_flight(baseline_model, image):
    """On SIGTERM uvicorn sets should_exit: a request in flight is answered, the server then stops."""
    app = create_app(baseline_model)
    service = app.state.service
    decode = service.decode_all
    started = threading.Event()

    def slow(items):
        started.set()
        time.sleep(1.0)
        return decode(items)

    service.decode_all = slow
    with running(app) as url:
        import httpx

        result: dict = {}
        t = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{url}/infer", json={"image": b64(image)}, timeout=30)))
        t.start()
        assert started.wait(20)
        server = _server_of(url)
        if server is not None:
            server.should_exit = True  # what uvicorn's SIGTERM / Ctrl-C handler does
        t.join(30)
    assert result["r"].status_code == 200 and "score" in result["r"].json()


def _server_of(url: str):
    import gc

    import uvicorn

    for obj in gc.get_objects():
        if isinstance(obj, uvicorn.Server) and obj.started and not obj.should_exit:
            return obj
    return None

