"""Inputs that were taken silently: a multi-page TIFF scored on its first page, a device or FIFO called an
"empty" model file, files a folder walk left out without a word."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from insightad.data.images import load_image
from insightad.errors import InsightADError
from insightad.model_file import read_metadata


def test_p35_multi_page_tiff_is_refused(tmp_path):
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 120, 240)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(InsightADError, match=r"stack.tif: a TIFF file with 3 pages; expected a single image"):
        load_image(path)
    single = tmp_path / "one.tif"
    pages[1].save(single)
    assert load_image(single) is not None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_p35_a_fifo_or_device_is_not_a_model_file(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InsightADError, match="not a regular file"):  # and never blocks on open
        read_metadata(fifo)
    if os.path.exists("/dev/zero"):
        with pytest.raises(InsightADError, match="/dev/zero: not a regular file"):
            read_metadata("/dev/zero")


def test_p35_predict_says_which_files_of_a_folder_it_left_out(tmp_path, baseline_model, mvtec_dir, capsys):
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    (folder / "part.png").write_bytes(good.read_bytes())
    (folder / "part_mask.png").write_bytes(good.read_bytes())
    (folder / "notes.txt").write_text("shift 2")
    (folder / ".hidden.png").write_bytes(good.read_bytes())
    assert main(["predict", "--model", str(baseline_model), "--json", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and "part.png" in out
    assert "2 files not scored" in err and "notes.txt" in err


@pytest.mark.parametrize("engine", ["auto", "onnx", "torch"])
def test_p35_every_engine_refuses_the_same_device_typo(baseline_model, mvtec_dir, engine, capsys):
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--engine", engine, "--device", "tpu", str(image)]) == 1
    assert "device: expected auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def test_p35_overlap_without_tiles_is_refused(baseline_model, mvtec_dir, capsys):
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--overlap", "0.25", str(image)]) != 0
    assert "--overlap: applies to tiled work; give --tile N" in capsys.readouterr().err
