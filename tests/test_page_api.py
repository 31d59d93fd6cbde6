"""What the web page needs from the server, without a browser: colour heatmaps in /infer, the model's
sha256 in /model, the colour bar, the page's files, and threshold files tied to their model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.apps.threshold_file import file_sha256, read_threshold_file
from insightad.cli import main as cli_main
from insightad.errors import InsightADError
from tests.mapdetector import map_model  # noqa: F401  (fixture)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(map_model):
    with TestClient(create_app(map_model, ServeParams())) as c:
        yield c


def test_model_exposes_its_sha256_and_the_page_and_colorbar_are_served(client, map_model):
    assert client.get("/model").json()["model_sha256"] == file_sha256(map_model)
    bar = client.get("/colorbar.png")
    assert bar.status_code == 200 and Image.open(io.BytesIO(bar.content)).format == "PNG"
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/assets/{asset}").status_code == 200
    assert "swagger-ui-bundle.js" in client.get("/docs").text and "redoc.standalone.js" in client.get("/redoc").text
    assert "cdn" not in client.get("/docs").text.lower()


def test_colorbar_and_page_need_the_key_only_where_the_api_does(map_model):
    with TestClient(create_app(map_model, ServeParams(api_key="k1"))) as c:
        assert c.get("/").status_code == 200  # the page itself holds nothing secret; it asks for the key
        assert c.get("/colorbar.png").status_code == 401
        assert c.get("/colorbar.png", headers={"X-API-Key": "k1"}).status_code == 200


def test_method_without_maps_has_no_colorbar(baseline_model):
    with TestClient(create_app(baseline_model, ServeParams(engine="torch"))) as c:
        assert c.get("/colorbar.png").status_code == 404


# ------------------------------------------------------------------------------ threshold files
def write(path: Path, body: dict) -> Path:
    path.write_text(json.dumps(body))
    return path


def test_threshold_file_for_this_model_is_read_and_another_models_refused(tmp_path, map_model):
    sha = file_sha256(map_model)
    assert read_threshold_file(write(tmp_path / "ok.json", {"threshold": 0.25, "model_sha256": sha}), map_model) == 0.25
    assert read_threshold_file(write(tmp_path / "any.json", {"threshold": 0.5}), map_model) == 0.5  # calibrate --out
    other = write(tmp_path / "other.json", {"threshold": 0.25, "model_sha256": "ab" * 32})
    with pytest.raises(InsightADError, match=r"other\.json: this threshold was chosen for another model"):
        read_threshold_file(other, map_model)
    with pytest.raises(InsightADError, match="finite"):
        read_threshold_file(write(tmp_path / "nan.json", {"threshold": float("nan")}), map_model)


@pytest.mark.parametrize("command", ["predict", "evaluate", "sort"])
def test_cli_refuses_a_threshold_file_of_another_model(command, tmp_path, baseline_model, mvtec_dir, capsys):
    other = write(tmp_path / "other.json", {"threshold": 1.0, "model_sha256": "cd" * 32})
    args = {"predict": ["predict", str(next((mvtec_dir / "test" / "good").iterdir()))],
            "evaluate": ["evaluate", "--data", str(mvtec_dir)],
            "sort": ["sort", "--input", str(mvtec_dir / "test" / "good"), "--out", str(tmp_path / "sorted")]}[command]
    rc = cli_main([*args, "--model", str(baseline_model), "--threshold", str(other)])
    err = capsys.readouterr().err
    assert rc != 0 and "other.json: this threshold was chosen for another model" in err
    assert not (tmp_path / "sorted").exists()  # refused before anything was written


def test_serve_tls_flags_need_both_files(tmp_path, map_model, capsys):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    rc = cli_main(["serve", "--model", str(map_model), "--ssl-certfile", str(cert)])
    assert rc != 0 and "give both" in capsys.readouterr().err
    rc = cli_main(["serve", "--model", str(map_model), "--ssl-certfile", str(cert), "--ssl-keyfile",
                   str(tmp_path / "missing.pem")])
    err = capsys.readouterr().err
    assert rc != 0 and "--ssl-keyfile" in err and "missing.pem: no such file" in err
