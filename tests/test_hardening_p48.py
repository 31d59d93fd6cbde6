"""A second adversarial pass over ``insightad serve``: ambiguous requests, API keys no client can send, TLS
keys, truncated uploads and the operators' page.

Each test failed before its fix and passes after it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.cli import main
from insightad.cli.serve import bind
from insightad.data.synthetic import make_image
from insightad.errors import InsightADError
from tests.test_hardening_p42 import chromium, page_server, served  # noqa: F401 - chromium, page_server: fixtures


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
    odd = _post_json(client, "/infer", b'{"\\u0069mage": "%s", "note": "caf\\u00e9", "n": %s, "extra": 1}'
                     % (_b64(_png(1)).encode(), b"9" * 4000))
    assert one.status_code == odd.status_code == 200, odd.text
    assert odd.json()["score"] == one.json()["score"]


def test_a_heatmap_form_field_given_twice_is_refused(client):
    r = client.post("/infer", files=[("file", ("a.png", _png(1), "image/png")), ("heatmap", (None, "true")),
                                     ("heatmap", (None, "false"))])
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "heatmap"]
    assert "more than once" in r.json()["detail"][0]["msg"]



@pytest.mark.parametrize("prefix", [" data:image/png;base64,", "\r\ndata:image/png;base64,",
                                    "data:image/png;name=part 7.png;base64,"])
def test_a_data_url_after_spaces_or_with_any_parameters_is_read(client, prefix):
    """Spaces and line breaks are allowed around the base64, but one before a data: URL left the prefix in the
    text ('not valid base64'), as did a parameter with a space in it (a file name)."""
    plain = client.post("/infer", json={"image": _b64(_png(3))})
    r = client.post("/infer", json={"image": prefix + _b64(_png(3))})
    assert r.status_code == 200, r.text
    assert r.json()["score"] == plain.json()["score"]


def test_a_data_url_that_is_not_base64_says_so(client):
    r = client.post("/infer", json={"image": "data:image/png," + _b64(_png(3))})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("image: a data: URL without ';base64,'")


def _multipart(image: bytes, heatmap: bytes) -> bytes:
    return (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png'
            b'\r\n\r\n' + image + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="heatmap"\r\n\r\n' + heatmap
            + b'\r\n--XyZ--\r\n')


@pytest.mark.parametrize("cut", ["inside the image", "inside the heatmap field"])
def test_an_upload_cut_before_its_closing_boundary_is_a_400_saying_so(client, cut):
    """A body cut inside the file part was answered 'file: Field required'; cut inside a later 'heatmap' part,
    the image was scored as if the field had not been sent."""
    whole = _multipart(_png(4), b"true")
    end = len(whole) // 2 if cut == "inside the image" else whole.rindex(b"true") + 2
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    assert client.post("/infer", content=whole, headers=headers).status_code == 200
    r = client.post("/infer", content=whole[:end], headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("body: not valid multipart/form-data (it ends inside a part, before the "
                                         "closing boundary: a truncated upload)")

class NoServer:
    """uvicorn.Server that never serves: a command line that should have been refused returns instead of hanging."""

    def __init__(self, config) -> None:
        pass

    def run(self, sockets) -> None:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("flag_key, env_key, source, words", [
    (None, "s3cret\n", "INSIGHTAD_API_KEY", "line break"),  # a key read from a file, newline and all
    (" s3cret", None, "--api-key", "space"),
    ("s\u00e9cret", None, "--api-key", "printable ASCII"),
    (None, "s3cret\u200b", "INSIGHTAD_API_KEY", "printable ASCII"),
])
def test_an_api_key_no_client_can_send_is_refused_at_startup(baseline_model, monkeypatch, capsys, flag_key, env_key,
                                                               source, words):
    """HTTP strips spaces and line breaks around a header value and carries no Unicode: the server started, and
    refused every request as 'wrong API key'."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "Server", NoServer)
    monkeypatch.delenv("INSIGHTAD_API_KEY", raising=False)
    if env_key is not None:
        monkeypatch.setenv("INSIGHTAD_API_KEY", env_key)
    argv = ["serve", "--model", str(baseline_model), "--port", "0"] + (["--api-key", flag_key] if flag_key else [])
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"insightad: error: {source}: ") and words in err[0], err



@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command to make a test certificate")
def test_an_encrypted_tls_key_is_refused_in_one_line_without_a_prompt(baseline_model, tmp_path, monkeypatch, capsys):
    """A private key with a passphrase made OpenSSL ask for it on the terminal (twice: the check, then uvicorn),
    and with no terminal the error said 'not a PEM certificate and its private key ([Errno 22] Invalid argument)'."""
    import uvicorn

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-passout", "pass:line-7"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    monkeypatch.setattr(uvicorn, "Server", NoServer)
    argv = ["serve", "--model", str(baseline_model), "--port", "0", "--ssl-certfile", str(cert), "--ssl-keyfile",
            str(key)]
    assert main(argv) != 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "encrypted with a passphrase" in lines[0] and str(key) in lines[0], lines
    assert "pass phrase" not in out + err

KEY = "line-7-secret"


@pytest.fixture(scope="module")
def keyed_page_server(baseline_model):
    settings = ServeParams(api_key=KEY)
    with served(create_app(baseline_model, settings), settings) as port:
        yield f"http://127.0.0.1:{port}"


def test_page_asks_again_for_a_key_no_request_can_carry(chromium, keyed_page_server):
    """A key pasted with an invisible character (U+200B) was stored and made every fetch() throw ('non ISO-8859-1
    code point'): the page retried GET /model for ever and never asked for the key again."""
    pg = chromium.new_page()
    pg.set_default_timeout(20_000)
    try:
        pg.goto(keyed_page_server + "/")
        pg.wait_for_selector("#key-dialog[open]")
        pg.fill("#key-input", KEY + "\u200b")
        pg.click("#key-submit")
        pg.wait_for_function("() => !document.getElementById('key-error').hidden || "
                             "!document.getElementById('key-dialog').open")
        assert pg.locator("#key-dialog[open]").count() == 1
        assert "printable ASCII" in pg.inner_text("#key-error")
        pg.fill("#key-input", KEY)
        pg.click("#key-submit")
        pg.wait_for_selector("body[data-ready]", state="attached")
        assert "baseline" in pg.inner_text("#model-summary")
    finally:
        pg.close()


def test_clearing_the_threshold_box_keeps_the_threshold(chromium, page_server, tmp_path):
    """Number('') is 0: emptying the threshold box set the page's threshold to 0, every image turned
    'anomalous' and 'export' wrote a threshold file with 0 in it."""
    files = []
    for seed in (11, 12):  # good parts, as the model was trained on
        files.append(tmp_path / f"part_{seed}.png")
        make_image("disc", None, size=96, seed=seed)[0].save(files[-1])
    pg = chromium.new_page()
    pg.set_default_timeout(20_000)
    try:
        pg.goto(page_server + "/")
        pg.wait_for_selector("body[data-ready]", state="attached")
        pg.set_input_files("#file-input", [str(f) for f in files])
        pg.wait_for_function("() => [...document.querySelectorAll('.card')].filter(c => c.dataset.decision)"
                             ".length === 2")
        pg.click(".tab[data-view=threshold]")
        before = pg.input_value("#thr-number"), pg.inner_text("#thr-summary")
        assert float(before[0]) > 0 and "0 of 2 images anomalous" in before[1]  # the served model's decisions
        for typed in ("", "-"):
            pg.eval_on_selector("#thr-number", "(el, v) => { el.value = v; el.dispatchEvent(new Event('change')); }",
                                typed)
            assert (pg.input_value("#thr-number"), pg.inner_text("#thr-summary")) == before
    finally:
        pg.close()


def test_a_key_in_the_query_string_is_not_called_missing(baseline_model):
    """``POST /infer?api_key=KEY`` was answered 'missing API key', though the client had sent one."""
    with TestClient(create_app(baseline_model, ServeParams(api_key=KEY))) as c:
        r = c.post("/infer?api_key=" + KEY, json={"image": _b64(_png(1))})
        assert r.status_code == 401
        assert r.json()["detail"].startswith("missing API key (a key in the URL's query string is not read")
        plain = c.post("/infer", json={"image": _b64(_png(1))}).json()["detail"]
        assert plain.startswith("missing API key: send it in the X-API-Key header")


@pytest.mark.parametrize("path, kind", [("/infer", "json"), ("/infer", "multipart"), ("/infer/batch", "json")])
def test_a_compressed_body_is_a_415_naming_the_encoding(client, path, kind):
    """A gzip body was parsed as it came: 'Invalid JSON: expected value at line 1 column 1'."""
    import gzip

    if kind == "json":
        field = "image" if path == "/infer" else "images"
        value = _b64(_png(1)) if path == "/infer" else [_b64(_png(1))]
        body, ctype = gzip.compress(json.dumps({field: value}).encode()), "application/json"
    else:
        body, ctype = gzip.compress(_multipart(_png(1), b"false")), "multipart/form-data; boundary=XyZ"
    r = client.post(path, content=body, headers={"Content-Type": ctype, "Content-Encoding": "gzip"})
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith("Content-Encoding 'gzip': not supported; expected the body uncompressed")


def test_a_body_refused_by_its_length_is_not_invited_with_100_continue(baseline_model):
    """curl sends 'Expect: 100-continue' for uploads over 1 MB and waits: the server answered '100 Continue' to a
    body its Content-Length had already refused, so the client sent all of it before reading the 413."""
    settings = ServeParams(max_body_mb=1.0, body_timeout_s=3.0)
    with served(create_app(baseline_model, settings), settings) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request body too large: 5000000 bytes" in answer


@pytest.mark.parametrize("path, query", [("/infer", "heatmap=true"), ("/infer", "image=abc&x=1"),
                                         ("/infer/batch", "heatmap=1")])
def test_a_body_field_in_the_query_string_is_refused_not_ignored(client, path, query):
    """``curl -F file=@part.png '.../infer?heatmap=true'`` was answered without a heatmap and without a word."""
    if path == "/infer":
        r = client.post(f"{path}?{query}", files={"file": ("a.png", _png(1), "image/png")})
    else:
        r = client.post(f"{path}?{query}", json={"images": [_b64(_png(1))]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["query", query.split("=")[0]] and "not read from the URL" in detail[0]["msg"]


@pytest.mark.parametrize("host, words", [("http://0.0.0.0", "is a URL"), ("0.0.0.0:8080", "has a port"),
                                         ("localhost:8080", "has a port")])
def test_a_host_written_as_a_url_or_with_a_port_says_so(host, words):
    """'--host http://0.0.0.0' was looked up as a name: 'cannot resolve ... (Name or service not known)'."""
    with pytest.raises(InsightADError, match=words):
        bind(host, 0)


def test_an_ipv6_host_in_brackets_is_the_address():
    try:
        sock = bind("[::1]", 0)
    except InsightADError as e:
        assert "cannot listen" in str(e)  # no IPv6 on this machine: refused as an address, not as a name
        pytest.skip("no IPv6 loopback here")
    with sock:
        assert sock.getsockname()[0] == "::1"


@pytest.mark.parametrize("path, ctype", [("/infer", "application/json"), ("/infer", None),
                                         ("/infer/batch", "application/json")])
def test_an_image_sent_as_the_body_is_told_how_to_send_it(client, path, ctype):
    """``curl --data-binary @part.png -H 'Content-Type: application/json'`` got 'Invalid JSON: expected value at
    line 1 column 1'."""
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post(path, content=_png(1), headers=headers)
    assert r.status_code == 422, r.text
    expected = ("{\"image\": \"<base64 of the file>\"} or a multipart upload in field 'file' (curl -F file=@part.png)"
                if path == "/infer" else "{\"images\": [\"<base64 of each file>\"]}")
    assert r.json()["detail"] == [{"loc": ["body"], "type": "json_invalid",
                                   "msg": f"an image file sent as the body, not JSON in UTF-8; expected {expected}"}]


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16-LE"),
                                             ("utf-16-be", "UTF-16-BE"), ("utf-32", "UTF-32")])
def test_json_in_utf16_is_told_to_send_utf8(client, encoding, named):
    """.NET's StringContent with Encoding.Unicode sends UTF-16: 'Invalid JSON: expected value at line 1 column 1'."""
    body = json.dumps({"image": _b64(_png(1))}).encode(encoding)
    r = client.post("/infer", content=body, headers={"Content-Type": f"application/json; charset={encoding}"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body"], "type": "json_invalid",
                                   "msg": f"{named} text, not JSON in UTF-8; expected {{\"image\": \"<base64 of "
                                          "the file>\"} or a multipart upload in field 'file' (curl -F file=@part.png)"}]


@pytest.mark.parametrize("body", [b"\x00\x00\x00\x00", b"\x00\xd8\x00\x00garbage", b"\x00"])
def test_binary_starting_with_nul_is_not_called_utf16(client, body):
    r = _post_json(client, "/infer", body)
    assert r.status_code == 422, r.text
    assert "UTF-16" not in r.text and "UTF-32" not in r.text
    assert r.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf"])
def test_utf8_json_with_or_without_bom_is_still_answered(client, prefix):
    r = _post_json(client, "/infer", prefix + json.dumps({"image": _b64(_png(1))}).encode())
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["Anomaly"], bool)


@pytest.mark.parametrize("path, fields, key, msg", [
    ("/infer", {"image": 1, "heatmaps": True}, "heatmaps", "not a field of this request; did you mean 'heatmap'?"),
    ("/infer", {"Image": 1}, "Image", "not a field of this request; did you mean 'image'? (names are case-sensitive)"),
    ("/infer", {"image": 1, "heat_map": True}, "heat_map",
     "not a field of this request; did you mean 'heatmap'? (names are case-sensitive)"),
    ("/infer", {"images": [1]}, "images", "a field of POST /infer/batch, not of this route; expected {\"image\": "
     "\"<base64 of the file>\"} or a multipart upload in field 'file' (curl -F file=@part.png)"),
    ("/infer", {"image": 1, "image2": 1}, "image2", "not a field of this request; did you mean 'image'? (several "
     "images go to POST /infer/batch as 'images')"),
    ("/infer/batch", {"image": 1}, "image",
     "a field of POST /infer, not of this route; expected {\"images\": [\"<base64 of each file>\"]}"),
    ("/infer/batch", {"images": [1], "Heatmap": True}, "Heatmap",
     "not a field of this request; did you mean 'heatmap'? (names are case-sensitive)"),
])
def test_a_misnamed_field_is_refused_not_ignored(client, path, fields, key, msg):
    """``{"image": .., "heatmaps": true}`` was answered without the heatmap it asked for, silently; ``{"Image": ..}``
    was 'image: Field required' and ``{"images": [..]}`` on /infer did not say that it belongs to /infer/batch."""
    good = _b64(_png(1))
    body = {k: ([good] if isinstance(v, list) else good if v == 1 and v is not True else v) for k, v in fields.items()}
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", key], "type": "unknown_field", "msg": msg}]


def test_other_unknown_fields_are_still_ignored(client):
    """Clients send their own metadata beside the image; only near-misses of a field are refused."""
    r = client.post("/infer", json={"image": _b64(_png(1)), "image_id": "a-17", "img": "x", "timestamp": 3,
                                    "filename": "part.png"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["Anomaly"], bool)


@pytest.mark.parametrize("files, data, key, msg", [
    ({"file": ("a.png", "PNG")}, {"heatmaps": "true"}, "heatmaps",
     "not a field of this upload; did you mean 'heatmap'?"),
    ({"File": ("a.png", "PNG")}, {}, "File",
     "not a field of this upload; did you mean 'file'? (names are case-sensitive)"),
    ({"image": ("a.png", "PNG")}, {}, "image",
     "not a field of this upload; the image file goes in field 'file' (curl -F file=@part.png)"),
    ({"file": ("a.png", "PNG")}, {"Heatmap": "1"}, "Heatmap",
     "not a field of this upload; did you mean 'heatmap'? (names are case-sensitive)"),
])
def test_a_misnamed_upload_field_is_refused_not_ignored(client, files, data, key, msg):
    """``curl -F file=@part.png -F heatmaps=true`` was answered without the heatmap it asked for, silently, and
    ``-F image=@part.png`` was 'file: Field required'."""
    files = {k: (name, _png(1)) for k, (name, _) in files.items()}
    r = client.post("/infer", files=files, data=data)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", key], "type": "unknown_field", "msg": msg}]


def test_an_upload_with_other_fields_is_still_scored(client):
    r = client.post("/infer", files={"file": ("a.png", _png(1))}, data={"note": "line 3", "camera": "2"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["Anomaly"], bool)


@pytest.mark.parametrize("auth, note", [
    ("Basic " + base64.b64encode(b"user:" + KEY.encode()).decode(),
     "an Authorization header is read only as 'Bearer KEY'; the one sent has another or no scheme"),
    ("Token " + KEY, "an Authorization header is read only as 'Bearer KEY'; the one sent has another or no scheme"),
    (KEY, "an Authorization header is read only as 'Bearer KEY'; the one sent has another or no scheme"),
    ("Bearer", "the Authorization header says 'Bearer' but holds no key"),
])
def test_an_authorization_header_not_bearer_is_not_called_missing(baseline_model, auth, note):
    """``curl -u``, ``Authorization: Token KEY`` or the key alone were answered 'missing API key', though the client
    had sent a key; the answer says which form is read, and echoes nothing of the header."""
    with TestClient(create_app(baseline_model, ServeParams(api_key=KEY))) as c:
        r = c.post("/infer", json={"image": _b64(_png(1))}, headers={"Authorization": auth})
        assert r.status_code == 401
        assert r.json()["detail"] == (f"missing API key ({note}): send it in the X-API-Key header or as "
                                      "'Authorization: Bearer KEY'")
        assert KEY not in r.text
        assert c.post("/infer", json={"image": _b64(_png(1))},
                      headers={"Authorization": "bearer " + KEY}).status_code == 200


def test_json_in_latin1_is_told_to_send_utf8(client):
    """A client's own field with an accent, in Windows-1252: 'Invalid JSON: invalid unicode code point at line 1
    column 40' did not say the body's encoding was the trouble."""
    body = b'{"image": "%s", "line": "Pr\xfcfstand 3"}' % _b64(_png(1)).encode()
    r = _post_json(client, "/infer", body)
    assert r.status_code == 422, r.text
    at = body.index(b"\xfc")
    assert r.json()["detail"] == [{"loc": ["body"], "type": "json_invalid", "msg": (
        f"text with a byte that is not UTF-8 (0xFC at offset {at}: Latin-1 or Windows-1252?), not JSON in UTF-8; "
        "expected {\"image\": \"<base64 of the file>\"} or a multipart upload in field 'file' (curl -F file=@part.png)")}]
    assert _post_json(client, "/infer", body.decode("latin-1").encode("utf-8")).status_code == 200


@pytest.mark.parametrize("inner", ["base64", "urlsafe", "lines", "data_url"])
def test_an_image_encoded_twice_is_told_so(client, inner):
    """A client that base64-encoded its base64 string (or its data: URL) again was told 'not a readable image',
    which sent people looking at the image file."""
    png = _png(1)
    text = {"base64": _b64(png), "urlsafe": base64.urlsafe_b64encode(png).decode(),
            "lines": base64.encodebytes(png).decode(), "data_url": "data:image/png;base64," + _b64(png)}[inner]
    r = client.post("/infer", json={"image": _b64(text.encode())})
    assert r.status_code == 400, r.text
    said = ("the base64 of a data: URL, so encoded twice; send the data: URL itself or the base64 of the file's bytes"
            if inner == "data_url" else
            "the base64 of base64 text, so encoded twice; send the base64 of the file's bytes once")
    assert r.json()["detail"] == f"image: {said}"
    batch = client.post("/infer/batch", json={"images": [_b64(png), _b64(text.encode())]})
    assert batch.status_code == 400 and batch.json()["detail"] == f"images[1]: {said}"


def test_base64_text_that_holds_no_image_keeps_its_message(client):
    r = client.post("/infer", json={"image": _b64(_b64(b"hello, this is not an image at all").encode())})
    assert r.status_code == 400
    assert r.json()["detail"] == "image: not a readable image (expected PNG, JPEG, BMP or TIFF)"


@pytest.mark.parametrize("text", [_b64(_png(1)), "data:image/png;base64," + _b64(_png(1))])
def test_an_uploaded_base64_text_file_is_told_to_upload_the_image(client, text):
    r = client.post("/infer", files={"file": ("part.b64", text.encode())})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == ("file: a text file holding a data: URL or base64, not the image file; upload the "
                                  "image file itself")


@pytest.mark.parametrize("files", [
    [("file", ("a.png", _png(1))), ("file", ("b.png", _png(2)))],
    [("file", ("a.png", _png(1))), ("extra", ("b.png", _png(2)))],
])
def test_two_files_in_one_upload_are_told_where_several_images_go(client, files):
    """Two files were 'body: not valid multipart/form-data (Too many files. Maximum number of files is 1)': the
    upload was valid, and the answer did not say where several images go."""
    r = client.post("/infer", files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", "file"], "type": "too_many_files", "msg": (
        "more than one file in this upload; expected one image file (several images go to POST /infer/batch as JSON "
        "{\"images\": [<base64 of each>]})")}]


@pytest.mark.parametrize("value, got", [
    ("true", "a string ('true': write true or false without quotes)"),
    ("False", "a string ('False': write true or false without quotes)"),
    ("yes", "a string ('yes')"), (1, "a number"), (None, "null"), ([True], "an array"),
])
def test_a_json_heatmap_that_is_not_true_or_false_says_what_came(client, value, got):
    """``"heatmap": "true"`` was 'Input should be a valid boolean', which did not say the quotes were the trouble."""
    for path, body in (("/infer", {"image": _b64(_png(1))}), ("/infer/batch", {"images": [_b64(_png(1))]})):
        r = client.post(path, json={**body, "heatmap": value})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == [{"loc": ["body", "heatmap"], "type": "bool_type",
                                       "msg": f"expected JSON true or false, got {got}"}]


@pytest.mark.parametrize("path, body, loc, msg", [
    ("/infer", {"image": None}, ["body", "image"], "expected a JSON string (the base64 of an encoded image), got null"),
    ("/infer", {"image": ["x"]}, ["body", "image"],
     "expected a JSON string (the base64 of an encoded image), got an array (several images go to POST "
     "/infer/batch as {\"images\": [...]})"),
    ("/infer/batch", {"images": [["x"]]}, ["body", "images", 0],
     "expected a JSON string (the base64 of an encoded image), got an array"),
    ("/infer/batch", {"images": [{"image": "x"}]}, ["body", "images", 0],
     "expected a JSON string (the base64 of an encoded image), got an object"),
    ("/infer/batch", {"images": "QUJD"}, ["body", "images"], "expected a JSON array of base64 strings, got a string "
     "(put it in [ ], or send one image to POST /infer as {\"image\": ...})"),
    ("/infer/batch", {"images": None}, ["body", "images"], "expected a JSON array of base64 strings, got null"),
])
def test_an_image_of_the_wrong_json_type_says_what_came(client, path, body, loc, msg):
    """An image sent as null, an object or ``"images": "<base64>"`` was 'Input should be a valid string' or 'a
    valid list', without saying what was expected of the field or what had come."""
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert [{k: e[k] for k in ("loc", "msg")} for e in r.json()["detail"]] == [{"loc": loc, "msg": msg}]


@pytest.mark.parametrize("path, body", [("/infer", b""), ("/infer", b" \r\n"), ("/infer/batch", b""),
                                        ("/infer", b"\xef\xbb\xbf")])
def test_an_empty_body_is_called_empty(client, path, body):
    """``curl -X POST .../infer`` without ``-d`` was 'Invalid JSON: EOF while parsing a value at line 1 column 0'."""
    r = client.post(path, content=body, headers={"Content-Type": "application/json"} if body else {})
    assert r.status_code == 422, r.text
    expected = ("{\"image\": \"<base64 of the file>\"} or a multipart upload in field 'file' (curl -F file=@part.png)"
                if path == "/infer" else "{\"images\": [\"<base64 of each file>\"]}")
    assert r.json()["detail"] == [{"loc": ["body"], "type": "missing",
                                   "msg": f"the request body is empty; expected {expected}"}]


@pytest.mark.parametrize("bare", ["base64", "lines", "data_url"])
def test_a_bare_base64_body_is_told_to_wrap_it_in_json(client, bare):
    """``curl -H 'Content-Type: application/json' -d @part.b64`` was 'Invalid JSON: expected value at line 1
    column 1', which did not say that the JSON object around the base64 was missing."""
    png = _png(1)
    body = {"base64": _b64(png), "lines": base64.encodebytes(png).decode(),
            "data_url": "data:image/png;base64," + _b64(png)}[bare].encode()
    for path in ("/infer", "/infer/batch"):
        r = _post_json(client, path, body)
        assert r.status_code == 422, r.text
        msg = r.json()["detail"][0]["msg"]
        assert msg.startswith("an image's base64 (or data: URL) sent as the body without the JSON around it, not "
                              "JSON in UTF-8; expected {\"image"), msg


@pytest.mark.parametrize("path, body, got", [
    ("/infer", "QUJD", "a string"), ("/infer", ["QUJD"], "an array"), ("/infer/batch", ["QUJD"], "an array"),
    ("/infer", 3, "a number"), ("/infer", None, "null"),
])
def test_a_body_that_is_not_a_json_object_says_what_came(client, path, body, got):
    """``json.dumps(b64)`` as the body was 'Input should be an object'."""
    r = _post_json(client, path, json.dumps(body).encode())
    assert r.status_code == 422, r.text
    expected = "{\"image\": \"<base64 of the file>\"}" if path == "/infer" else "{\"images\": [\"<base64 of each file>\"]}"
    assert r.json()["detail"] == [{"loc": ["body"], "type": "model_type",
                                   "msg": f"expected a JSON object {expected}, got {got}"}]
