"""Issue 12 point 25: `info` reads every file the tool writes: model files, ONNX exports, ssl backbone files."""

from __future__ import annotations

import json

from insightad.cli import main


def _info(capsys, path):
    code = main(["info", "--model", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_p25_info_reads_an_onnx_export(baseline_model, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--model", str(baseline_model), "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    code, out, err = _info(capsys, onnx_path)
    assert code == 0, err
    meta = json.loads(out)
    assert meta["file"] == "onnx-export" and meta["method"] == "baseline" and meta["input_height"] > 0


def test_p25_info_reads_an_ssl_backbone_file(mvtec_dir, tmp_path, capsys):
    out_path = tmp_path / "bb.safetensors"
    code = main(["train", "--method", "ssl", "--data", str(mvtec_dir), "--out", str(out_path),
                 "--backbone", "test_efficientnet", "--init", "random", "--image-size", "32", "--epochs", "1",
                 "--batch-size", "8", "--val-fraction", "0", "--no-progress"])
    capsys.readouterr()
    assert code == 0
    code, out, err = _info(capsys, out_path)
    assert code == 0, err
    meta = json.loads(out)
    assert meta["file"] == "backbone" and meta["method"] == "ssl" and meta["arch"] == "test_efficientnet"
    assert meta["split"]["train"].endswith(" files")


def test_p25_foreign_file_still_refused(tmp_path, capsys):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    code, _, err = _info(capsys, f)
    assert code == 1 and str(f) in err and err.count("\n") == 1
