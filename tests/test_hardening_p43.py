"""Hardening, round 43: backbone levels by module name on the command line, as the README says."""

from __future__ import annotations

import pytest

from insightad.cli import main


def test_p43_layers_take_module_names_on_the_command_line(mvtec_dir, tmp_path, capsys):
    """``--layers blocks.2,blocks.4`` (the README: numbers or module names) trains like a config file's names; a
    name the backbone lacks is refused naming what it has, and a malformed item is still an argparse error."""
    out = tmp_path / "m.safetensors"
    assert main(["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--layers",
                 "blocks.2,blocks.4", "--out", str(out), "--no-onnx"]) == 0, capsys.readouterr().err
    from insightad.model_file import read_metadata

    assert read_metadata(out)["params"]["layers"] == ["blocks.2", "blocks.4"]
    assert main(["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--layers",
                 "blocks.99", "--out", str(tmp_path / "n.safetensors"), "--no-onnx"]) == 1
    assert "blocks.99" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "padim", "--data", str(mvtec_dir), "--layers", "1.5", "--out",
              str(tmp_path / "o.safetensors")])
    assert "expected a list of int or module names such as blocks.2" in capsys.readouterr().err


def test_p43_labels_read_names_guarded_against_spreadsheets(tmp_path):
    """A name written after a ' (the page's guard against a spreadsheet running ``=...``) is read without it; a name
    whose ' is its own (``'quoted.png``) is kept as it is."""
    from insightad.decide.labels import read_labels

    f = tmp_path / "labels.csv"
    f.write_text("name,label,score,model_sha256\n'=cmd.png,anomalous,3.5,\n'+x.png,normal,1.0,\n'quoted.png,normal,1.1,\n"
                 "-1.png,normal,0.9,\n")
    assert read_labels(f).names == ["=cmd.png", "+x.png", "'quoted.png", "-1.png"]


def test_p43_calibrate_labels_naming_a_folder_says_so(map_model_for_labels, tmp_path, capsys):
    """A labels file row naming a folder is refused as a folder (it read 'not found'), one image as one image."""
    model, good = map_model_for_labels
    folder = tmp_path / "imgs"
    folder.mkdir()
    f = tmp_path / "labels.csv"
    f.write_text(f"path,label\n{folder},normal\n{good},normal\n")
    assert main(["calibrate", "--model", str(model), "--labels", str(f), "--dry-run"]) == 1
    assert "1 listed path is a folder, e.g." in capsys.readouterr().err
    f.write_text(f"path,label\n{tmp_path / 'gone.png'},normal\n{good},normal\n")
    assert main(["calibrate", "--model", str(model), "--labels", str(f), "--dry-run"]) == 1
    assert "1 listed image not found, e.g." in capsys.readouterr().err


@pytest.fixture
def map_model_for_labels(baseline_model, mvtec_dir):
    return baseline_model, sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]


def test_p43_augment_refuses_what_would_not_fit_on_the_disk(tmp_path, capsys, monkeypatch):
    """--copies that would fill the disk are refused before a file is written, saying how much and how much is free."""
    import shutil
    from collections import namedtuple

    from PIL import Image

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (40, 40), (90, 120, 30)).save(src / "a.png")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 5000, 5000))
    assert main(["augment", "--input", str(src), "--out", str(out), "--copies", "5000"]) == 1
    assert "--copies: 5000 files for each of 1 images would write about" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.undo()
    assert main(["augment", "--input", str(src), "--out", str(out), "--copies", "2"]) == 0
    assert len(list(out.iterdir())) == 2
