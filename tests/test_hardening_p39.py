"""Second sweep: calibrate refreshes only the model's own graph beside it, threshold files take JSON numbers
and hexadecimal hashes only, a FIFO is never read as a threshold or ONNX file, export says an .onnx is already
a graph."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from insightad.cli import main


def test_p39_calibrate_leaves_a_file_that_is_not_its_graph_alone(baseline_model, mvtec_dir, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    foreign = tmp_path / "m.onnx"
    foreign.write_bytes(b"another model's graph, or anything else")
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir)]) == 0
    assert foreign.read_bytes() == b"another model's graph, or anything else"
    assert "left as it is: not this model's ONNX graph" in capsys.readouterr().out


@pytest.mark.parametrize("body, message", [({"threshold": True}, "must be a JSON number, got true"),
                                           ({"threshold": "21.5"}, 'must be a JSON number, got "21.5"'),
                                           ({"threshold": 2.0, "model_sha256": 123}, "'model_sha256' must be 64"),
                                           ({"threshold": 2.0, "model_sha256": "ab"}, "'model_sha256' must be 64")])
def test_p39_threshold_files_take_numbers_and_hashes_only(body, message, baseline_model, mvtec_dir, tmp_path, capsys):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps(body))
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--threshold", str(thr), str(image)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_p39_fifos_are_not_read(baseline_model, mvtec_dir, tmp_path, capsys):
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    os.mkfifo(tmp_path / "thr.json")
    assert main(["predict", "--model", str(baseline_model), "--threshold", str(tmp_path / "thr.json"), str(image)]) == 1
    assert "is not a regular file" in capsys.readouterr().err
    os.mkfifo(tmp_path / "m.onnx")
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), str(image)]) == 1
    assert "m.onnx: not a regular file (a pipe, socket or device); expected an ONNX file" in capsys.readouterr().err


def test_p39_export_of_a_graph_says_what_it_is(tmp_path, capsys):
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"x")
    assert main(["export", "--model", str(graph), "--out", str(tmp_path / "again.onnx")]) == 1
    assert "already an ONNX graph" in capsys.readouterr().err


@pytest.mark.parametrize("layers, message", [("1,,2", "expected a list of int"), ("1,2,", "expected a list of int"),
                                             ("-1", "distinct levels counted from 0"),
                                             ("1,1", "distinct levels counted from 0"),
                                             ("9", "not available for tf_efficientnet_lite0: it has levels 0-4")])
def test_p39_layers_are_checked(layers, message, mvtec_dir, tmp_path, capsys):
    argv = ["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--layers", layers,
            "--out", str(tmp_path / "m.safetensors"), "--no-onnx"]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses what it cannot parse
        rc = e.code
    assert rc in (1, 2) and message in capsys.readouterr().err


def test_p39_a_config_string_for_a_list_option_is_one_item(baseline_model, mvtec_dir, tmp_path, capsys):
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[predict]\nimage = "{image}"\n')
    assert main(["predict", "--config", str(cfg), "--model", str(baseline_model), "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    cfg.write_text("[predict]\nimage = [1, 2]\njson = true\n")
    assert main(["predict", "--config", str(cfg), "--model", str(baseline_model)]) == 1
    assert "key 'image': expected a list of strings (or one string), got [1, 2]" in capsys.readouterr().err
