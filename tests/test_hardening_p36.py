"""Switches and counts that were taken loosely: HTTP heatmap flags must be booleans, a TLS pair must load before
the server says it serves, demo's method and the CLI's worker/CPU/chunk counts are checked before any work."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from insightad.apps.serve import create_app
from insightad.apps.serve.settings import ServeParams
from insightad.cli import main


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 120, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(baseline_model):
    with TestClient(create_app(baseline_model, ServeParams())) as c:
        yield c


@pytest.mark.parametrize("value", ["yes", 1, "true", None])
def test_p36_json_heatmap_must_be_a_boolean(client, value):
    r = client.post("/infer", json={"image": base64.b64encode(_png()).decode(), "heatmap": value})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "heatmap"
    r = client.post("/infer/batch", json={"images": [base64.b64encode(_png()).decode()], "heatmap": value})
    assert r.status_code == 422


def test_p36_form_heatmap_words(client):
    for word, code in (("true", 200), ("0", 200), ("Off", 200), ("abc", 422)):
        r = client.post("/infer", files={"file": ("x.png", _png(), "image/png")}, data={"heatmap": word})
        assert r.status_code == code, word
    assert "heatmap" in r.json()["detail"][0]["loc"] and "'abc'" in r.json()["detail"][0]["msg"]


def test_p36_bad_tls_files_fail_before_serving(baseline_model, tmp_path, capsys):
    junk = tmp_path / "cert.pem"
    junk.write_bytes(_png())
    assert main(["serve", "--model", str(baseline_model), "--ssl-certfile", str(junk), "--ssl-keyfile", str(junk)]) == 1
    out, err = capsys.readouterr()
    assert "not a PEM certificate and its private key" in err and "serving" not in out


def test_p36_demo_method_checked_before_any_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--method", "bogus", "--out", str(tmp_path / "demo")])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv", [["sort", "--input", "x", "--workers", "0"],
                                  ["batch", "--input", "x", "--out", "r.parquet", "--ray-cpus", "0"],
                                  ["batch", "--input", "x", "--out", "r.parquet", "--chunk", "-3"],
                                  ["train", "--data", "x", "--workers", "0"]])
def test_p36_counts_below_one_are_refused(argv, baseline_model, capsys):
    with pytest.raises(SystemExit):
        main([argv[0], "--model", str(baseline_model), *argv[1:]] if argv[0] != "train" else argv)
    assert "expected a whole number >= 1" in capsys.readouterr().err
