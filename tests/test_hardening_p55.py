"""Hardening p55: a per-client limit on open scoring requests (``--max-requests-per-client``).

The server bounded connections and queued requests for everyone together, not per client: one camera PC firing
requests in parallel could take every queue slot, and the other stations of the line got 503 until it stopped.
A client over its limit now gets 429 (JSON, ``Retry-After``) while the others are served; its count is given back
however a request ends. The app is driven in-process (httpx's ASGI transport sets the client's address); a
request is held open by a body that is not sent until the test says so, never by timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from insightad.apps.serve import create_app
from insightad.apps.serve.server import uvicorn_config
from insightad.apps.serve.settings import ServeParams
from insightad.cli import main
from insightad.data.synthetic import make_image
from tests.test_serve_api import RESPONSE_KEYS, b64, png_bytes

A, B = "10.0.0.1", "10.0.0.2"


@pytest.fixture(scope="module")
def payload() -> bytes:
    img, _ = make_image("disc", None, size=96, seed=55)
    return json.dumps({"image": b64(png_bytes(img))}).encode()


class HeldBody:
    """A request body sent only once ``go`` is set: until then its request is open on the server (counted against
    its client and admitted, since the server reads a body only after both); ``started`` says it got there."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.started, self.go = payload, asyncio.Event(), asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started.set()
        await self.go.wait()
        yield self.payload


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    """Run ``app``'s start-up and shut-down around the block; yields a factory of clients sending from an
    address (the ASGI scope's ``client``, as uvicorn gives the connection's peer)."""
    clients: list[httpx.AsyncClient] = []

    def client_from(host: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False, client=(host, 50000))
        clients.append(httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60))
        return clients[-1]

    async with app.router.lifespan_context(app):
        try:
            yield client_from
        finally:
            for c in clients:
                await c.aclose()


async def hold(client: httpx.AsyncClient, body: HeldBody) -> asyncio.Task[httpx.Response]:
    """Send a request with a held body; returns once the server has counted it (its body is being waited for)."""
    task = asyncio.create_task(client.post("/infer", content=body.chunks(),
                                           headers={"Content-Type": "application/json"}))
    started = asyncio.create_task(body.started.wait())
    await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)  # (timeout: a safety net)
    assert started.done(), f"answered instead of held open: {task.result().status_code if task.done() else None}"
    return task


def infer(client: httpx.AsyncClient, payload: bytes, **headers: str) -> Awaitable[httpx.Response]:
    return client.post("/infer", content=payload, headers={"Content-Type": "application/json", **headers})


def refused_total(text: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith("insightad_client_limited_total "))
    return float(line.split()[1])


def test_p55_off_by_default_and_in_the_cli(baseline_model, capsys):
    assert ServeParams().max_requests_per_client == 0
    assert main(["serve", "--model", str(baseline_model), "--max-requests-per-client", "-1"]) == 1
    assert "max_requests_per_client: expected a value >= 0" in capsys.readouterr().err


def test_p55_under_the_limit_the_contract_is_unchanged(baseline_model, payload):
    app = create_app(baseline_model, ServeParams(max_requests_per_client=2))

    async def scenario() -> list[httpx.Response]:
        async with serving(app) as client_from:
            a = client_from(A)
            held = HeldBody(payload)
            first = await hold(a, held)
            second = await infer(a, payload)  # the client's second open request: within its limit
            held.go.set()
            return [await first, second]

    for r in asyncio.run(scenario()):
        assert r.status_code == 200 and set(r.json()) == RESPONSE_KEYS and isinstance(r.json()["Anomaly"], bool)
    assert app.state.service.clients.open == {}


def test_p55_default_lets_one_client_hold_many(baseline_model, payload):
    app = create_app(baseline_model, ServeParams())

    async def scenario() -> list[httpx.Response]:
        async with serving(app) as client_from:
            a = client_from(A)
            bodies = [HeldBody(payload) for _ in range(4)]
            tasks = [await hold(a, body) for body in bodies]
            for body in bodies:
                body.go.set()
            return [await t for t in tasks]

    assert [r.status_code for r in asyncio.run(scenario())] == [200] * 4


def test_p55_over_the_limit_is_429_with_retry_after(baseline_model, payload):
    app = create_app(baseline_model, ServeParams(max_requests_per_client=2))

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, str]:
        async with serving(app) as client_from:
            a = client_from(A)
            bodies = [HeldBody(payload), HeldBody(payload)]
            tasks = [await hold(a, body) for body in bodies]
            refused = await infer(a, payload)
            batch = await a.post("/infer/batch", json={"images": [json.loads(payload)["image"]]})
            for body in bodies:
                body.go.set()
            answered = [await t for t in tasks]
            after = await infer(a, payload)  # its requests answered, the client is served again
            metrics = (await a.get("/metrics")).text
            return answered, refused, batch, metrics + f"\n{after.status_code}"

    answered, refused, batch, metrics = asyncio.run(scenario())
    assert [r.status_code for r in answered] == [200, 200] and metrics.endswith("\n200")
    for r in (refused, batch):
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json" and list(r.json()) == ["detail"]
        detail = r.json()["detail"]
        assert A in detail and "2 scoring requests open" in detail and "--max-requests-per-client" in detail
    assert refused_total(metrics) == 2
    assert app.state.service.clients.open == {}


def test_p55_clients_are_counted_apart(baseline_model, payload):
    app = create_app(baseline_model, ServeParams(max_requests_per_client=1))

    async def scenario() -> list[int]:
        async with serving(app) as client_from:
            a, b = client_from(A), client_from(B)
            held = HeldBody(payload)
            task = await hold(a, held)
            codes = [(await infer(a, payload)).status_code,
                     (await infer(a, payload, **{"X-Forwarded-For": B})).status_code,  # not read: still A
                     (await infer(b, payload)).status_code]
            held.go.set()
            return [*codes, (await task).status_code]

    assert asyncio.run(scenario()) == [429, 429, 200, 200]


def test_p55_errors_give_the_count_back(baseline_model, payload):
    """With a limit of one, a client whose every request failed is served: each error gave its count back."""
    app = create_app(baseline_model, ServeParams(max_requests_per_client=1, max_images=2))
    service = app.state.service
    decode = service.decode_all

    def broken(items: Any) -> Any:
        raise RuntimeError("a bug in decoding")

    async def scenario() -> list[int]:
        async with serving(app) as client_from:
            a = client_from(A)
            codes = [(await infer(a, b"{not json")).status_code,
                     (await infer(a, b'{"img": "x"}')).status_code,
                     (await infer(a, b'{"image": "%%%"}')).status_code,
                     (await infer(a, json.dumps({"image": b64(b"not an image")}).encode())).status_code,
                     (await a.post("/infer/batch", json={"images": ["x"] * 3})).status_code]
            service.decode_all = broken
            codes.append((await infer(a, payload)).status_code)
            service.decode_all = decode
            codes.append((await infer(a, payload)).status_code)
            return codes

    assert asyncio.run(scenario()) == [422, 422, 400, 400, 413, 500, 200]
    assert service.clients.open == {}


def test_p55_disconnect_and_cancel_give_the_count_back(baseline_model, payload):
    app = create_app(baseline_model, ServeParams(max_requests_per_client=1))
    service = app.state.service

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def scenario() -> tuple[list[int], dict[str, int], int]:
        async with serving(app) as client_from:
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/infer", "raw_path": b"/infer", "query_string": b"", "root_path": "",
                     "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
                     "client": (A, 50000), "server": ("testserver", 80)}
            await app(scope, gone, send)  # the client left before sending its body
            statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
            a = client_from(A)
            task = await hold(a, HeldBody(payload))
            task.cancel()  # the request's task ends mid-request (as on shutdown)
            with pytest.raises(asyncio.CancelledError):
                await task
            left = dict(service.clients.open)
            return statuses, left, (await infer(a, payload)).status_code

    statuses, left, after = asyncio.run(scenario())
    assert statuses == [499] and left == {} and after == 200


def test_p55_client_is_the_peer_not_a_forwarded_header(baseline_model):
    app = create_app(baseline_model, ServeParams())
    assert uvicorn_config(app, ServeParams()).proxy_headers is False  # unless --trusted-proxies names proxies


def _held_on_uvicorn(model, payload: bytes, settings: ServeParams, forwarded: str | None, counted: str,
                     posts: list[tuple[str | None, str]]) -> tuple[list[httpx.Response], bytes]:
    """On a real uvicorn with ``insightad serve``'s options: one request held open from 127.0.0.1 (its body not
    sent; X-Forwarded-For ``forwarded`` if given) until it is counted against ``counted``; meanwhile each of
    ``posts`` (X-Forwarded-For or None, local address) is sent whole. (their answers, the held one's)."""
    from tests.test_hardening_p42 import served
    from tests.test_serve_http import wait_for

    app = create_app(model, settings)
    header = b"" if forwarded is None else b"X-Forwarded-For: %s\r\n" % forwarded.encode()
    with served(app, settings) as port, socket.create_connection(("127.0.0.1", port)) as held:
        held.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                     b"Content-Length: %d\r\n\r\n" % (header, len(payload)))
        wait_for(lambda: app.state.service.clients.open == {counted: 1}, "the held request to be counted")
        answers = []
        for fwd, local in posts:
            headers = {"Content-Type": "application/json", **({"X-Forwarded-For": fwd} if fwd else {})}
            with httpx.Client(transport=httpx.HTTPTransport(local_address=local), timeout=30) as c:
                answers.append(c.post(f"http://127.0.0.1:{port}/infer", content=payload, headers=headers))
        held.sendall(payload)
        return answers, held.recv(65536)


def test_p55_on_uvicorn_the_client_is_the_connection_peer(baseline_model, payload):
    """A request held open from 127.0.0.1 counts against 127.0.0.1 whatever X-Forwarded-For says; 127.0.0.2
    (another peer) is served."""
    (refused, served_other), answer = _held_on_uvicorn(
        baseline_model, payload, ServeParams(max_requests_per_client=1), None, "127.0.0.1",
        [("10.9.9.9", "127.0.0.1"), (None, "127.0.0.2")])
    assert refused.status_code == 429 and "127.0.0.1" in refused.json()["detail"]
    assert served_other.status_code == 200 and answer.startswith(b"HTTP/1.1 200")


def test_p55_trusted_proxies_name_the_client(baseline_model, payload):
    """Behind a reverse proxy every client arrives from the proxy's address: with ``--trusted-proxies`` its
    X-Forwarded-For names the client (the limit counts it and the access log shows it); a peer that is not
    listed is still taken as it is, whatever header it sends."""
    settings = ServeParams(max_requests_per_client=1, trusted_proxies="127.0.0.1")
    (same, other, untrusted), answer = _held_on_uvicorn(
        baseline_model, payload, settings, "10.9.9.9", "10.9.9.9",
        [("10.9.9.9", "127.0.0.1"), ("10.8.8.8", "127.0.0.1"), ("10.9.9.9", "127.0.0.2")])
    assert same.status_code == 429 and "10.9.9.9" in same.json()["detail"]
    assert other.status_code == 200 and untrusted.status_code == 200 and answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("value, said", [("", "empty"), (" , ", "empty"), ("proxy.local", "'proxy.local' is not"),
                                         ("10.0.0.0/33", "'10.0.0.0/33' is not")])
def test_p55_trusted_proxies_are_checked_before_the_model_loads(baseline_model, capsys, value, said):
    assert main(["serve", "--model", str(baseline_model), "--trusted-proxies", value, "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert f"--trusted-proxies: {said}" in err and "Traceback" not in err


def test_p55_trusted_proxies_accept_addresses_and_networks():
    from insightad.apps.serve.server import trusted_proxies

    assert trusted_proxies(None) is None
    assert trusted_proxies(" 127.0.0.1, 10.0.0.0/8 ,::1") == "127.0.0.1,10.0.0.0/8,::1"
