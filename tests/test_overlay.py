"""Overlays: heatmap + outline at the pixel threshold for map methods, verdict banner for all; predict --overlay."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from insightad.cli import main
from insightad.render.colormap import MapScale
from insightad.render.names import output_names
from insightad.render.overlay import OUTLINE_RGB, render_overlay
from tests.mapdetector import map_model  # noqa: F401  (fixture)


def _banner_height(img: Image.Image, frame_rgb) -> int:
    """Rows above the coloured frame (the verdict banner)."""
    col = np.asarray(img)[:, 0]
    return int(np.argmax(np.all(col == frame_rgb, axis=1)))


def test_outline_drawn_exactly_around_the_region_above_the_level():
    img = Image.new("RGB", (400, 400), (60, 60, 60))
    m = np.zeros((400, 400), np.float32)
    m[100:200, 150:300] = 1.0
    out = render_overlay(img, 2.0, 1.0, anomaly_map=m, scale=MapScale(0.5, 0.1), score_normalized=0.99)
    top = _banner_height(out, (220, 40, 40))
    frame = int(np.argmax(np.any(np.asarray(out)[top + 50] != (220, 40, 40), axis=1)))  # a colour bar now sits right
    body = np.asarray(out)[top + frame: top + frame + 400, frame: frame + 400]
    white = np.all(body == OUTLINE_RGB, axis=2)
    ys, xs = np.nonzero(white)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (100, 199, 150, 299)
    assert not white[120:180, 170:280].any()  # outline only, not filled
    assert np.abs(body[150, 50].astype(int) - 60).max() <= 1  # far below the level: left as it is
    assert body[150, 220, 0] > 100  # hot: coloured


def test_image_level_overlay_has_verdict_and_is_enlarged_when_small():
    small = Image.new("RGB", (64, 48), (10, 120, 10))
    out = render_overlay(small, 0.2, 0.5, score_normalized=0.1)
    assert min(out.size) >= 320  # readable text
    assert _banner_height(out, (40, 170, 70)) > 10  # green frame below a banner: NORMAL
    bad = render_overlay(small, 0.9, 0.5)
    assert _banner_height(bad, (220, 40, 40)) > 10


def test_overlay_names_never_collide(tmp_path):
    names = output_names([tmp_path / d / "img.png" for d in ("a", "b", "b")], "overlay")
    assert names == ["img_overlay.png", "b_img_overlay.png", "b_img_2_overlay.png"]


def test_predict_overlay_image_level(baseline_model, mvtec_dir, tmp_path, capsys):
    imgs = [mvtec_dir / "test" / "good" / "000.png", mvtec_dir / "test" / "blob" / "000.png"]
    out = tmp_path / "ov"
    assert main(["predict", "--model", str(baseline_model), *map(str, imgs), "--overlay", str(out), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["overlay"] for r in rows] == [str(out / "000_overlay.png"), str(out / "blob_000_overlay.png")]
    for r in rows:
        assert 0 < r["score_normalized"] < 1 and (r["score_normalized"] > 0.5) == r["anomalous"]
        with Image.open(r["overlay"]) as im:
            assert im.format == "PNG" and min(im.size) >= 320


def test_predict_overlay_map_method(map_model, mvtec_dir, tmp_path, capsys):
    img = mvtec_dir / "test" / "blob" / "001.png"
    out = tmp_path / "ov"
    assert main(["predict", "--model", str(map_model), str(img), "--overlay", str(out)]) == 0
    assert "1 overlays written" in capsys.readouterr().out
    with Image.open(out / "001_overlay.png") as im:
        arr = np.asarray(im.convert("RGB"))
    assert np.all(arr == OUTLINE_RGB, axis=2).sum() > 20  # the blob is outlined
