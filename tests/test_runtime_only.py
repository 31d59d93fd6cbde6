"""The scoring path without PyTorch: in a subprocess where importing torch or timm raises (a meta-path
hook, ``tests/no_torch_site/sitecustomize.py``), predict, evaluate, sort, info and serve's /infer run on
an exported graph and give the full path's scores; commands that need PyTorch say which extra to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SIZE

HOOK = Path(__file__).parent / "no_torch_site"

SCRIPT = r"""
import base64, contextlib, io, json, sys
from insightad.cli import main

cfg = json.loads(sys.argv[1])
out = {}

def run(name, argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    out[name] = {"rc": rc, "out": stdout.getvalue(), "err": stderr.getvalue()}

onnx, data = cfg["onnx"], cfg["data"]
run("predict", ["predict", "--model", onnx, "--json", *cfg["images"]])
run("evaluate", ["evaluate", "--model", onnx, "--data", data, "--json"])
run("sort", ["sort", "--model", onnx, "--input", cfg["sort_in"], "--out", cfg["sort_out"], "--json"])
run("info", ["info", "--model", onnx])
run("beside", ["predict", "--model", cfg["model_beside"], "--json", cfg["images"][0]])
run("no_graph", ["predict", "--model", cfg["model_alone"], "--json", cfg["images"][0]])
run("torch_engine", ["predict", "--model", cfg["model_beside"], "--engine", "torch", cfg["images"][0]])
run("train", ["train", "--data", data])
if cfg.get("batch"):
    run("batch", ["batch", "--model", onnx, "--input", cfg["sort_in"], "--out", cfg["batch"], "--json"])

import socket, subprocess, time, urllib.request

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "insightad", "serve", "--model", onnx, "--host", "127.0.0.1",
                           "--port", str(port), "--no-access-log"], stderr=subprocess.PIPE, text=True)
try:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start: " + server.stderr.read()[-2000:])
            time.sleep(0.2)
    image = base64.b64encode(open(cfg["images"][1], "rb").read()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", json.dumps({"image": image, "heatmap": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out["serve"] = {"status": r.status, "body": json.load(r)}
finally:
    server.terminate()
    server.wait(30)
from insightad.runtime import torch_available

out["torch_installed"] = torch_available()
out["blocked_modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def padim_export(mvtec_dir, tmp_path_factory):
    """A PaDiM model file, its export stamped beside it, and the same model file alone in another folder."""
    from insightad.apps.train import train_model, write_graph_beside
    from insightad.config import DataParams

    root = tmp_path_factory.mktemp("runtime-only")
    det, path, _ = train_model(mvtec_dir, "padim", {"image_size": SIZE, "n_features": 48}, DataParams(),
                               root / "padim.safetensors", progress=False)
    graph, _ = write_graph_beside(det, path)  # what `insightad train` writes: the stamped graph beside
    assert graph == path.with_suffix(".onnx")
    alone = root / "alone" / "padim.safetensors"
    alone.parent.mkdir()
    shutil.copy(path, alone)
    return path, path.with_suffix(".onnx"), alone


def run_scoring(python: str, env: dict[str, str], padim_export, mvtec_dir, tmp_path, batch: bool) -> tuple[dict, list]:
    """The scoring commands in a subprocess of ``python``; (their results, the images scored)."""
    model, onnx, alone = padim_export
    images = sorted(str(p) for p in (mvtec_dir / "test").rglob("*.png"))[:6]
    sort_in = tmp_path / "incoming"
    sort_in.mkdir()
    for p in images[:4]:
        shutil.copy(p, sort_in / f"{Path(p).parent.name}-{Path(p).name}")
    cfg = {"onnx": str(onnx), "data": str(mvtec_dir), "images": images, "sort_in": str(sort_in),
           "sort_out": str(tmp_path / "sorted"), "model_beside": str(model), "model_alone": str(alone),
           "batch": str(tmp_path / "results.parquet") if batch else None}
    env = {**env, "INSIGHTAD_CACHE": str(tmp_path / "empty-cache")}  # no cached graph: only the one beside the model
    proc = subprocess.run([python, "-c", SCRIPT, json.dumps(cfg)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), images


def check_scoring(got: dict, images: list, padim_export, mvtec_dir, tmp_path) -> None:
    """The subprocess's answers equal the full path's (PyTorch) within 1e-4; PyTorch needs say what to install."""
    from insightad.config import DataParams
    from insightad.evaluate.run import evaluate_model
    from insightad.inference.load import load_for_inference

    model, _, _ = padim_export
    assert got["blocked_modules_loaded"] == []
    full = load_for_inference(model, engine="torch")
    ref = full.predict(images, maps=True)
    assert got["predict"]["rc"] == 0, got["predict"]["err"]
    rows = [json.loads(line) for line in got["predict"]["out"].splitlines()]
    np.testing.assert_allclose([r["score"] for r in rows], ref.scores, rtol=1e-4)
    assert [r["anomalous"] for r in rows] == ref.anomalous.tolist()
    np.testing.assert_allclose([r["score_normalized"] for r in rows], ref.scores_normalized, atol=1e-4)
    beside = json.loads(got["beside"]["out"])
    assert got["beside"]["rc"] == 0 and beside["score"] == pytest.approx(ref.scores[0], rel=1e-4)

    assert got["evaluate"]["rc"] == 0, got["evaluate"]["err"]
    metrics = json.loads(got["evaluate"]["out"])
    ev = evaluate_model(full, mvtec_dir, DataParams(), progress=False).metrics
    for key in ("image_auroc", "average_precision", "accuracy", "pixel_auroc", "aupro"):
        assert metrics[key] == pytest.approx(ev[key], abs=2e-3), key

    assert got["sort"]["rc"] == 0, got["sort"]["err"]
    assert len(list((tmp_path / "sorted").rglob("*.png"))) == 4
    info = json.loads(got["info"]["out"])
    assert info["file"] == "onnx-export" and info["method"] == "padim"
    if "batch" in got:
        assert got["batch"]["rc"] == 0, got["batch"]["err"]
        assert json.loads(got["batch"]["out"])["inputs"] == 4

    serve = got["serve"]
    assert serve["status"] == 200, serve
    assert serve["body"]["score"] == pytest.approx(ref.scores[1], rel=1e-4) and serve["body"]["heatmap"]

    # what needs PyTorch says which extra (or which command) in one line
    assert got["no_graph"]["rc"] == 1 and "insightad export" in got["no_graph"]["err"]
    assert "insightad[train]" in got["no_graph"]["err"] and len(got["no_graph"]["err"].strip().splitlines()) == 1
    assert got["torch_engine"]["rc"] == 1 and "pip install 'insightad[train]'" in got["torch_engine"]["err"]
    assert got["train"]["rc"] == 1 and "pip install 'insightad[train]'" in got["train"]["err"]


def test_scoring_path_runs_without_torch_and_matches_the_full_path(padim_export, mvtec_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOK), str(Path(__file__).parents[1] / "src")])}
    got, images = run_scoring(sys.executable, env, padim_export, mvtec_dir, tmp_path, batch=True)
    check_scoring(got, images, padim_export, mvtec_dir, tmp_path)


@pytest.mark.skipif(not os.environ.get("INSIGHTAD_RUNTIME_PYTHON"), reason="make wheel-test sets "
                    "INSIGHTAD_RUNTIME_PYTHON to a fresh venv with the wheel installed without extras")
def test_runtime_only_install(padim_export, mvtec_dir, tmp_path):
    """The real runtime-only install (``make wheel-test``): the wheel without extras in a fresh venv."""
    python = os.environ["INSIGHTAD_RUNTIME_PYTHON"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    got, images = run_scoring(python, env, padim_export, mvtec_dir, tmp_path, batch=False)
    assert got["torch_installed"] is False
    check_scoring(got, images, padim_export, mvtec_dir, tmp_path)


def test_stale_graph_beside_a_model_file_is_not_used(padim_export, tmp_path):
    """A graph beside a model file made from other content (the model recalibrated, or swapped) is ignored."""
    from insightad.inference.load import stored_graph
    from insightad.model_file import read_metadata

    model, onnx, _ = padim_export
    copy = tmp_path / "padim.safetensors"
    shutil.copy(model, copy)
    shutil.copy(onnx, copy.with_suffix(".onnx"))
    with open(copy, "ab") as f:  # other content, same name: the stamp no longer matches
        f.write(b" ")
    assert stored_graph(copy, read_metadata(model)) is None
    assert stored_graph(model, read_metadata(model)) is not None


def test_torch_first_methods_match_their_detectors():
    """``inference.load.TORCH_FIRST`` (read without importing PyTorch) says what the methods' classes say."""
    from insightad.inference.load import TORCH_FIRST
    from insightad.methods import get_method, list_methods

    assert TORCH_FIRST == {m for m in list_methods() if not get_method(m).onnx_auto}
