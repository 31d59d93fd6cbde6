"""Issue 42: an adversarial pass over ``insightad serve`` (the HTTP API and the operators' page).

Each test failed before its fix and passes after it."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
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
    s.settimeout(within)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
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
            assert all(_closed_by_server(s, 5) for s in (idle, slow, kept))
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
