"""Issue 12 point 4: a NaN score is an error for that image, never "normal"; NaN models and NaN pixels are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from insightad.errors import InsightADError
from insightad.model_file import META_KEY, load_model


def _nan_for_second(det):
    """Make the detector score the second image of every batch NaN (a model fault on some inputs)."""
    forward = det.forward_batch

    def patched(x):
        s, m = forward(x)
        s = s.copy()  # numpy (the scoring loop runs on numpy arrays)
        if len(s) > 1:
            s[1] = float("nan")
        return s, m
    det.forward_batch = patched
    return det


def test_p4_nan_score_is_an_error_not_normal(baseline_model, mvtec_dir):
    det = _nan_for_second(load_model(baseline_model))
    paths = sorted((mvtec_dir / "test" / "good").iterdir())[:3]
    pred = det.predict(paths, maps=False, strict=False)
    assert list(pred.errors) == [1] and str(paths[1]) in pred.errors[1] and "not a finite number" in pred.errors[1]
    assert not pred.labels[1] and np.isnan(pred.scores[1]) and np.isfinite(pred.scores[[0, 2]]).all()
    with pytest.raises(InsightADError, match="not a finite number"):
        det.predict(paths, maps=False, strict=True)


def test_p4_nan_score_is_an_error_row_in_sort(baseline_model, mvtec_dir, tmp_path):
    import csv

    from insightad.apps.sort import FolderSorter

    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((mvtec_dir / "test" / "good").iterdir())[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    det = _nan_for_second(load_model(baseline_model))
    s = FolderSorter(det, src, tmp_path / "out", batch_size=8, progress=False).run()
    assert s.errors == 1 and s.normal + s.anomalous == 2
    with open(tmp_path / "out" / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "not a finite number" in bad[0]["error"]


def _rewrite(model, path, change_tensors=None, change_meta=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = load_file(str(model))
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_p4_model_scoring_nan_is_refused_at_load(baseline_model, mvtec_dir, tmp_path, capsys, engine):
    path = tmp_path / "nan.safetensors"
    _rewrite(baseline_model, path, change_tensors=lambda t: t["mean"].fill_(float("nan")))  # the Gaussian's mean: every score
    image = next((mvtec_dir / "test" / "good").iterdir())
    code = main(["predict", "--model", str(path), "--engine", engine, str(image)])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1
    assert str(path) in err and "NaN" in err


def test_p4_zero_std_is_refused_at_load(baseline_model, mvtec_dir, tmp_path, capsys):
    path = tmp_path / "std0.safetensors"
    _rewrite(baseline_model, path, change_meta=lambda m: m["preprocessing"].update(std=[0.0, 0.0, 0.0]))
    image = next((mvtec_dir / "test" / "good").iterdir())
    code = main(["predict", "--model", str(path), "--engine", "torch", str(image)])
    err = capsys.readouterr().err
    assert code == 1 and str(path) in err and "preprocessing.std" in err


def test_p4_float_tiff_with_nan_pixel_is_refused(baseline_model, tmp_path, capsys):
    arr = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    arr[3, 5] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(arr, mode="F").save(path)
    code = main(["predict", "--model", str(baseline_model), "--engine", "torch", str(path)])
    out, err = capsys.readouterr()
    assert code != 0 and str(path) in err and "NaN or infinite" in err
    assert "normal" not in out.split("threshold")[-1]


def test_p4_finite_float_tiff_still_reads(tmp_path):
    from insightad.data.images import load_image

    path = tmp_path / "ok.tif"
    Image.fromarray(np.linspace(0, 5, 1600, dtype=np.float32).reshape(40, 40), mode="F").save(path)
    assert load_image(path, 3).size == (40, 40)
