"""Issue 42: an adversarial pass over ``insightad serve`` (the HTTP API and the operators' page).

Each test failed before its fix and passes after it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.cli import main
from insightad.cli.serve import bind
from insightad.data.images import load_image
from tests.test_serve_http import wait_healthy


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_limit_of_one_thread_never_refuses_another_threads_image(monkeypatch):
    """Pillow's pixel limit is one process-wide variable: the decoder set it to each call's own limit around
    its decoding, so a server decoding a batch (whose pixel budget was nearly used) in one decode thread made
    another thread refuse a 40x40 image as 'image too large: more than the limit of 40000000 pixels'."""
    other_opened, release = threading.Event(), threading.Event()
    plain_open = PngImagePlugin.PngImageFile._open
    other = threading.Thread(target=load_image, args=(_png(8), 1), kwargs={"max_pixels": 70})

    def paused_open(self):  # a thread switch just after the 40x40 header is read, before Pillow checks its size
        plain_open(self)
        if self.size == (40, 40):
            other.start()  # another request's image, with a limit of 70 pixels
            other_opened.wait(1)
        elif self.size == (8, 8):
            other_opened.set()
            release.wait(10)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", paused_open)
    try:
        img = load_image(_png(40), 1, max_pixels=40_000_000)  # was: InsightADError 'image too large'
    finally:
        release.set()
        other.join(10)
    assert img.size == (40, 40)


def test_pixel_limit_still_refuses_from_the_header(monkeypatch):
    from insightad.errors import InsightADError

    with pytest.raises(InsightADError, match="image too large: more than the limit of 1599 pixels"):
        load_image(_png(40), 1, max_pixels=1599)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is left as it was


# ------------------------------------------------------------------ idle and slow request heads
@contextmanager
def served(app, settings):
    """``app`` on uvicorn with the options ``insightad serve`` uses (``uvicorn_config``), on a free port."""
    import uvicorn

    from insightad.apps.serve.server import uvicorn_config

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, settings, "warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{sock.getsockname()[1]}")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def _closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server closes ``s`` within ``within`` seconds (what it still had to send is read first)."""
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_idle_and_slow_heads_cannot_hold_every_connection_slot(baseline_model):
    """uvicorn timed out only the gap after an answer: connections that sent nothing, or their head a byte at
    a time, were held for ever, and --max-connections of them made the server answer 503 to everyone."""
    settings = ServeParams(max_connections=4, head_timeout_s=0.5)  # 3 held + 1 request
    with served(create_app(baseline_model, settings), settings) as port:
        idle = socket.create_connection(("127.0.0.1", port))
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and the rest of its head never comes
        kept = socket.create_connection(("127.0.0.1", port))  # one answer, then half of the next head
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        try:
            assert [_closed_by_server(s, 5) for s in (idle, slow, kept)] == [True] * 3
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        finally:
            for s in (idle, slow, kept):
                s.close()


def test_head_deadline_never_cuts_a_request_that_is_running(baseline_model):
    settings = ServeParams(head_timeout_s=0.3)
    app = create_app(baseline_model, settings)
    decode = app.state.service.decode_all

    def slow(items):
        time.sleep(1.0)  # decoding and inference take longer than the head deadline
        return decode(items)

    app.state.service.decode_all = slow
    with served(app, settings) as port, httpx.Client(timeout=20) as client:
        url = f"http://127.0.0.1:{port}/infer"
        for _ in range(2):  # twice on one keep-alive connection
            r = client.post(url, json={"image": base64.b64encode(_png(40)).decode()})
            assert r.status_code == 200 and set(r.json()) >= {"Anomaly", "score"}


def test_cli_serve_runs_uvicorn_with_the_head_deadline(baseline_model, monkeypatch):
    import uvicorn

    from insightad.apps.serve.server import HeadTimeoutProtocol

    seen = {}

    class Recorder:
        def __init__(self, config):
            seen["config"] = config

        def run(self, sockets):
            for s in sockets:
                s.close()

    monkeypatch.setattr(uvicorn, "Server", Recorder)
    assert main(["serve", "--model", str(baseline_model), "--port", "0", "--head-timeout-s", "2.5"]) == 0
    protocol = seen["config"].http
    assert issubclass(protocol, HeadTimeoutProtocol) and protocol.head_timeout_s == 2.5


# ------------------------------------------------------------------ the page with a failing server
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium); these tests never download a browser")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page_server(baseline_model):
    settings = ServeParams()
    with served(create_app(baseline_model, settings), settings) as port:
        yield f"http://127.0.0.1:{port}"


def _open_with_failing_model_route(chromium, url: str, failures: int):
    """The page, with its first ``failures`` GET /model answered 503 in plain text (as uvicorn's connection
    limit answers, or a proxy while the server restarts)."""
    pg = chromium.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    seen = {"n": 0}

    def model_route(route):
        seen["n"] += 1
        if seen["n"] <= failures:
            route.fulfill(status=503, body="Service Unavailable", content_type="text/plain")
        else:
            route.continue_()

    pg.route("**/model", model_route)
    pg.goto(url + "/")
    pg.wait_for_function("() => /cannot read the model/.test(document.getElementById('model-summary').textContent)")
    return pg, errors


def test_page_shows_the_servers_decisions_when_it_could_not_read_the_model(chromium, page_server, mvtec_dir,
                                                                          tmp_path):
    """With GET /model failing when the page loaded, the page's threshold stayed null and every image with a
    positive score was shown 'anomalous' (score > null), whatever the server decided."""
    files = []
    for kind, n in (("good", 2), ("blob", 1)):
        for i, src in enumerate(sorted((mvtec_dir / "test" / kind).glob("*.png"))[:n]):
            files.append(tmp_path / f"{kind}_{i}.png")
            shutil.copy(src, files[-1])
    pg, errors = _open_with_failing_model_route(chromium, page_server, failures=10**6)
    try:
        pg.set_input_files("#file-input", [str(f) for f in files])
        pg.wait_for_function(f"() => [...document.querySelectorAll('.card')].filter(c => c.dataset.decision)"
                             f".length === {len(files)}")
        shown = pg.eval_on_selector_all(".card", "cs => cs.map(c => [c.querySelector('.name').textContent, "
                                                 "c.dataset.decision])")
        for name, decision in shown:
            path = next(f for f in files if f.name == name)
            served_answer = httpx.post(f"{page_server}/infer", json={"image": base64.b64encode(path.read_bytes())
                                                                     .decode()}, timeout=30).json()
            assert decision == ("anomalous" if served_answer["Anomaly"] else "normal"), (name, served_answer)
        assert {d for _, d in shown} == {"normal", "anomalous"}  # the check above compared both kinds
        assert not errors, errors
    finally:
        pg.close()


def test_page_reads_the_model_again_after_a_failure(chromium, page_server):
    pg, errors = _open_with_failing_model_route(chromium, page_server, failures=1)
    try:
        pg.wait_for_function("() => /baseline/.test(document.getElementById('model-summary').textContent)")
        pg.wait_for_selector("body[data-ready]", state="attached")
        assert not errors, errors
    finally:
        pg.close()


def test_page_follows_a_server_that_now_decides_with_another_threshold(chromium, page_server, mvtec_dir, tmp_path):
    """The server restarted with another --threshold while the page stayed open: the page went on deciding
    with the threshold it had read at load, and showed 'normal' where the server now said 'anomalous'."""
    image = tmp_path / "good_0.png"
    shutil.copy(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0], image)
    pg = chromium.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    restarted = {"yes": False}
    new_threshold = -1.0  # every score is above it

    def model_route(route):
        resp = route.fetch()
        body = resp.json()
        if restarted["yes"]:
            body["threshold"] = {"value": new_threshold, "strategy": "override (serve --threshold)"}
        route.fulfill(response=resp, json=body)

    def infer_route(route):  # (Playwright's route.fetch drops a multipart body: the test scores the file itself)
        body = httpx.post(f"{page_server}/infer", json={"image": base64.b64encode(image.read_bytes()).decode()},
                          timeout=30).json()
        assert body["Anomaly"] is False  # what the page would show, deciding with the threshold it read at load
        body.update(threshold=new_threshold, Anomaly=True, anomalous=True)
        route.fulfill(status=200, json=body)

    try:
        pg.route("**/model", model_route)
        pg.goto(page_server + "/")
        pg.wait_for_selector("body[data-ready]", state="attached")
        restarted["yes"] = True
        pg.route("**/infer", infer_route)
        pg.set_input_files("#file-input", [str(image)])
        pg.wait_for_function("() => document.querySelector('.card') && document.querySelector('.card').dataset.decision")
        assert pg.eval_on_selector(".card", "c => c.dataset.decision") == "anomalous"
        pg.wait_for_function("() => /threshold -1\\b/.test(document.getElementById('model-summary').textContent)")
        assert not errors, errors
    finally:
        pg.close()


def test_over_the_connection_limit_the_answer_is_json(baseline_model):
    """uvicorn answered requests over --max-connections with a plain-text 'Service Unavailable', the one error
    of the server that was not JSON {"detail": ...}: a client parsing the error body failed on it."""
    settings = ServeParams(max_connections=2)
    with served(create_app(baseline_model, settings), settings) as port:
        held = socket.create_connection(("127.0.0.1", port))  # one connection open, with a request on another
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        finally:
            held.close()
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert "--max-connections" in r.json()["detail"] and r.headers["retry-after"] == "1"
        time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200  # and serves on


# ------------------------------------------------------------------ decoded pixels held by all requests
def _png_b64(side: int) -> str:
    return base64.b64encode(_png(side)).decode()


def test_decoded_pixels_of_all_requests_together_are_bounded(baseline_model):
    """--queue-size bounded the requests held and --max-pixels each one, but a 120 kB PNG declares 36 million
    pixels (108 MB decoded, more in inference): 32 such requests at once took the server from 0.1 to 4.4 GB.
    Decoded pixels held by all requests together are now bounded too: past the budget a request gets 503."""
    app = create_app(baseline_model, ServeParams(engine="onnx", max_pixels=4000, max_pixels_in_flight=5000))
    det = app.state.detector
    assert det.decoded_input  # the engine takes each image at its own size (the graph resizes): decoded pixels stay
    entered, release = threading.Event(), threading.Event()
    forward = det.forward_batch

    def held_forward(x):
        if x.shape[-1] == 60:  # the first request's image stays in inference until released
            entered.set()
            release.wait(10)
        return forward(x)

    det.forward_batch = held_forward
    with TestClient(app) as c:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/infer", json={"image": _png_b64(60)})))
        t.start()
        try:
            assert entered.wait(20)
            r = c.post("/infer", json={"image": _png_b64(50)})  # 2500 + 3600 decoded pixels > 5000
            held = app.state.service.pixels.held
        finally:
            release.set()
            t.join(20)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "--max-pixels-in-flight" in r.json()["detail"] and r.json()["detail"].startswith("server busy: image")
        assert held == 3600 and first["r"].status_code == 200
        assert c.post("/infer", json={"image": _png_b64(50)}).status_code == 200  # the budget was given back
        assert app.state.service.pixels.held == 0


def test_pixel_budget_is_given_back_by_every_failure(baseline_model):
    app = create_app(baseline_model, ServeParams(engine="onnx", max_pixels=4000, max_pixels_in_flight=5000))
    with TestClient(app) as c:
        noise = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60), np.uint8)).save(noise, format="PNG")
        bad = base64.b64encode(noise.getvalue()[:400]).decode()  # a header that reads, pixels that do not
        for body in ({"image": bad}, {"images": [_png_b64(20), bad]}):
            r = c.post("/infer" if "image" in body else "/infer/batch", json=body)
            assert r.status_code == 400, r.text
        assert app.state.service.pixels.held == 0
        assert c.post("/infer", json={"image": _png_b64(60)}).status_code == 200


# ------------------------------------------------------------------ multipart uploads
def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (side, side, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_over_a_megabyte_never_touch_the_disk(baseline_model, monkeypatch):
    """A multipart upload over 1 MB was spooled to a temporary file (Starlette's default), so a full /tmp made a
    1.4 MB image a 500 (and every large upload cost a disk write, which a JSON body never did). Uploads are
    read into memory, as JSON bodies are, within --max-body-mb."""
    import tempfile

    def disk_full(self):
        raise OSError(28, "No space left on device")

    image = _noise_png(700)
    assert len(image) > 1_100_000
    with TestClient(create_app(baseline_model, ServeParams()), raise_server_exceptions=False) as c:
        monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", disk_full)
        r = c.post("/infer", files={"file": ("big.png", image, "image/png")})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"xx"),  # no boundary
    ("multipart/form-data; boundary=abc", b"xx"),  # not multipart data
    ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Disposition: form-data\r\n\r\nx\r\n--abc--\r\n"),
])
def test_malformed_multipart_is_refused_naming_what_was_expected(baseline_model, content_type, body):
    with TestClient(create_app(baseline_model, ServeParams())) as c:
        r = c.post("/infer", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert "multipart/form-data" in r.json()["detail"] and "'file'" in r.json()["detail"], r.json()
        assert c.post("/infer", files={"file": ("a.png", _png(40), "image/png")}).status_code == 200


# ------------------------------------------------------------------ HEAD
def test_head_is_answered_like_get_without_a_body(baseline_model):
    """HEAD /health and HEAD / answered 405: `curl -I` and monitors that probe with HEAD saw a broken server."""
    with TestClient(create_app(baseline_model, ServeParams())) as c:
        for path in ("/health", "/", "/model", "/assets/app.js", "/openapi.json"):
            get, head = c.get(path), c.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
            assert head.headers.get("content-length") == get.headers.get("content-length"), path
        r = c.head("/infer")  # a POST route stays POST only
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
        assert c.head("/nope").status_code == 404


def test_pngs_pillow_cannot_identify_still_count_against_the_pixel_limits(baseline_model):
    """libspng decodes a PNG whose IHDR checksum is damaged, Pillow cannot even identify it: its pixels were
    counted as unknown (0), so a batch of them passed the per-request limit (and the in-flight budget)."""
    damaged = bytearray(_noise_png(60))
    damaged[29:33] = bytes(4)  # IHDR's CRC
    item = base64.b64encode(bytes(damaged)).decode()
    with TestClient(create_app(baseline_model, ServeParams(max_pixels=4000))) as c:
        r = c.post("/infer/batch", json={"images": [item, item]})  # 2 x 3600 pixels
        assert r.status_code == 413 and "per request" in r.json()["detail"], r.text


def test_json_body_with_a_utf8_byte_order_mark_is_read(baseline_model):
    """PowerShell 5 writes a BOM into UTF-8 files; such a body was 422 'Invalid JSON ... line 1 column 1'."""
    body = b"\xef\xbb\xbf" + json.dumps({"image": _png_b64(40)}).encode()
    with TestClient(create_app(baseline_model, ServeParams())) as c:
        r = c.post("/infer", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and isinstance(r.json()["Anomaly"], bool), r.text
        batch = b"\xef\xbb\xbf" + json.dumps({"images": [_png_b64(40)]}).encode()
        assert c.post("/infer/batch", content=batch, headers={"Content-Type": "application/json"}).status_code == 200


# ------------------------------------------------------------------ heatmaps of large images
@pytest.fixture(scope="module")
def map_model(mvtec_dir, tmp_path_factory):
    from insightad.apps.train import train_model
    from insightad.config import DataParams
    from tests.mapdetector import NAME, register_meandev

    register_meandev()
    out = tmp_path_factory.mktemp("p42-map-model") / "meandev.safetensors"
    train_model(mvtec_dir, NAME, {"image_size": 64}, DataParams(), out, progress=False)
    return out


def test_heatmap_of_a_large_image_is_made_at_the_size_it_is_sent(map_model, monkeypatch):
    """The model-size map was brought to the image's own size (36 million floats for a 6000 px photo) and the
    coloured PNG then shrunk to 1024 px: 3.5 s instead of 0.8 s and 750 MB more per answer with a heatmap."""
    import insightad.apps.serve.service as service_module

    sizes: list[tuple[int, int]] = []
    upsample = service_module.upsample_maps

    def recording(maps, targets):
        sizes.extend(tuple(t) for t in targets)
        return upsample(maps, targets)

    monkeypatch.setattr(service_module, "upsample_maps", recording)
    image = io.BytesIO()
    Image.new("RGB", (3000, 1500), (90, 90, 90)).save(image, format="PNG")
    with TestClient(create_app(map_model, ServeParams(engine="torch"))) as c:
        body = c.post("/infer", json={"image": base64.b64encode(image.getvalue()).decode(), "heatmap": True}).json()
    with Image.open(io.BytesIO(base64.b64decode(body["heatmap"]))) as heat:
        assert heat.size == (1024, 512)
    assert sizes == [(512, 1024)]  # was [(1500, 3000)]


@pytest.mark.parametrize("request_bytes", [
    b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",  # two lengths
    b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(50),  # a TLS hello on the plain-HTTP port
])
def test_a_request_that_is_not_http_gets_a_json_400(baseline_model, request_bytes):
    """uvicorn answered 'Invalid HTTP request received.' in plain text, the server's other non-JSON error."""
    settings = ServeParams()
    with served(create_app(baseline_model, settings), settings) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(request_bytes)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer[:300]
        assert "expected a well-formed HTTP/1.1 request" in json.loads(body)["detail"]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
