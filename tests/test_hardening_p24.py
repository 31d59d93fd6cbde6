"""Issue 12 point 24: a pixel bomb's message names one limit; wrong-size masks stop every method's
evaluation; formats outside PNG, JPEG, BMP and TIFF are refused with one line, whatever the extension."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from insightad.data.images import load_image
from insightad.errors import InsightADError


def test_p24_pixel_bomb_names_one_limit(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 300)).save(path)
    with pytest.raises(InsightADError) as e:
        load_image(path, max_pixels=10_000)
    msg = str(e.value)
    assert str(path) in msg and "10000" in msg
    assert set(re.findall(r"\d{4,}", msg)) == {"10000"}  # one limit named, not PIL's own second figure


@pytest.mark.parametrize("fmt,ext", [("GIF", "gif"), ("WEBP", "webp"), ("PPM", "ppm"), ("ICO", "ico"),
                                     ("GIF", "png")])
def test_p24_unlisted_formats_refused(tmp_path, fmt, ext):
    path = tmp_path / f"x.{ext}"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(path, format=fmt)
    with pytest.raises(InsightADError, match=f"{fmt} images are not accepted") as e:
        load_image(path)
    assert str(path) in str(e.value) and "PNG, JPEG, BMP or TIFF" in str(e.value)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("TIFF", "tif")])
def test_p24_listed_formats_read(tmp_path, fmt, ext):
    path = tmp_path / f"x.{ext}"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(path, format=fmt)
    assert load_image(path, 3).size == (32, 32)


def test_p24_wrong_mask_size_stops_baseline_evaluate(baseline_model, mvtec_dir, tmp_path, capsys):
    data = tmp_path / "disc"
    shutil.copytree(mvtec_dir, data)
    mask = min((data / "ground_truth").rglob("*_mask.png"))
    Image.new("L", (10, 10)).save(mask)
    code = main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--engine", "torch"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and str(mask) in err and "must match its image's size" in err
