"""Dataset layouts, image formats, masks, splits, and every bad input the data layer can meet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightad.data import discover, load_image, load_mask
from insightad.data.layouts import evaluation_samples, holdout_split
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError


def _img(path: Path, size=(40, 30), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


def test_detects_each_layout(mvtec_dir, folder_dir, crack_dir, tmp_path):
    assert discover(mvtec_dir).layout == "mvtec"
    assert discover(folder_dir).layout == "folder"
    assert discover(crack_dir).layout == "crack"
    _img(tmp_path / "flat" / "a.png")
    assert discover(tmp_path / "flat").layout == "images"


def test_mvtec_samples_and_masks(mvtec_dir):
    ds = discover(mvtec_dir)
    assert len(ds.train) == 30 and all(s.label == 0 for s in ds.train)
    bad = [s for s in ds.test if s.label == 1]
    assert len(bad) == 16 and all(s.mask is not None and s.mask.stem == s.path.stem + "_mask" for s in bad)
    assert {s.defect for s in bad} == {"scratch", "blob", "crack", "missing"}


def test_folder_layout_masks_by_stem_and_custom_names(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        _img(root / "ok" / f"{i:03d}.bmp")
    _img(root / "ng" / "003.jpg")
    _img(root / "ng" / "004.tif")  # a defect image without a mask still counts
    mask = np.zeros((30, 40), np.uint8)
    mask[5:9, 5:9] = 253  # real sets use 253/254/255: any non-zero value is a defect pixel
    Image.fromarray(mask).save(root / "ng" / "003_mask.png")
    ds = discover(root, normal_dir="ok", abnormal_dir="ng")
    assert ds.layout == "folder"
    anomalous = {s.path.name: s for s in ds.samples if s.label == 1}
    assert set(anomalous) == {"003.jpg", "004.tif"}
    assert anomalous["003.jpg"].mask.name == "003_mask.png" and anomalous["004.tif"].mask is None
    m = load_mask(anomalous["003.jpg"].mask, (40, 30))
    assert m.sum() == 16 and m.dtype == bool


def test_forced_layout_and_bad_layouts(tmp_path, mvtec_dir):
    with pytest.raises(InsightADError, match="crack layout needs a Negative"):
        discover(mvtec_dir, layout="crack")
    with pytest.raises(InsightADError, match="folder layout needs"):
        discover(mvtec_dir, layout="folder")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(InsightADError, match=r"nope: no such file or folder"):
        discover(tmp_path / "nope")
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises(InsightADError, match=r"normal: no images found"):
        discover(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    with pytest.raises(InsightADError, match="blank: no images found"):
        discover(tmp_path / "blank")
    f = _img(tmp_path / "x.png")
    with pytest.raises(InsightADError, match="expected a dataset folder"):
        discover(f)


def test_folder_of_categories_names_them(tmp_path, mvtec_dir):
    root = tmp_path / "mvtec_root"
    root.mkdir()
    (root / "bottle").symlink_to(mvtec_dir, target_is_directory=True)
    with pytest.raises(InsightADError, match="several MVTec AD categories.*bottle"):
        discover(root)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_formats_and_modes(tmp_path, fmt, mode):
    path = tmp_path / f"im.{fmt}"
    Image.new(mode, (33, 21), 200 if mode == "L" else (200, 10, 10)).save(path)
    img = load_image(path, 3)
    assert img.mode == "RGB" and img.size == (33, 21)
    x, size = Preprocessing(size=(16, 16)).load(path)
    assert x.dtype == np.float32 and x.shape == (3, 16, 16) and size == (21, 33)
    assert 0 <= x.min() and x.max() <= 255


def test_16bit_tiff_and_palette(tmp_path):
    arr = (np.arange(20 * 10).reshape(10, 20) * 300).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.tif")
    img = load_image(tmp_path / "deep.tif")
    assert img.mode == "L"
    Image.new("P", (8, 8)).save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").mode == "RGB"


def test_truncated_and_corrupt_images(tmp_path):
    good = _img(tmp_path / "good.png", size=(200, 200))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InsightADError, match=r"trunc.png: unreadable or truncated image"):
        load_image(tmp_path / "trunc.png")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(InsightADError, match=r"junk.jpg: not a readable image"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(InsightADError, match="file not found"):
        load_image(tmp_path / "absent.png")


def test_jpeg_truncated(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(tmp_path / "n.jpg", quality=95)
    data = (tmp_path / "n.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(InsightADError, match="t.jpg: unreadable or truncated"):
        load_image(tmp_path / "t.jpg")


def test_mask_size_mismatch_names_both(tmp_path):
    _img(tmp_path / "m_mask.png", size=(10, 10), mode="L", value=255)
    with pytest.raises(InsightADError, match=r"m_mask.png: mask is 10x10 but the image of .*img.png is 40x30"):
        load_mask(tmp_path / "m_mask.png", (40, 30), image_path=tmp_path / "img.png")


def test_pixel_limit(tmp_path):
    _img(tmp_path / "big.png", size=(300, 300))
    with pytest.raises(InsightADError, match="too large"):
        load_image(tmp_path / "big.png", max_pixels=10_000)


def test_holdout_split_is_deterministic_and_disjoint(folder_dir):
    ds = discover(folder_dir)
    a_train, a_held = holdout_split(ds, 0.2, seed=5)
    b_train, b_held = holdout_split(ds, 0.2, seed=5)
    _, c_held = holdout_split(ds, 0.2, seed=6)
    assert [s.path for s in a_held] == [s.path for s in b_held]
    assert {s.path for s in a_held} != {s.path for s in c_held}
    assert len(a_held) == 6 and not ({s.path for s in a_train} & {s.path for s in a_held})


def test_mvtec_has_no_holdout(mvtec_dir):
    train, held = holdout_split(discover(mvtec_dir), 0.2, 0)
    assert len(train) == 30 and held == []


def test_evaluation_samples_same_path_other_path_and_refusal(folder_dir, tmp_path):
    ds = discover(folder_dir)
    train, held = holdout_split(ds, 0.2, 0)
    split = {"root": str(ds.root), "train": [ds.rel(s.path) for s in train],
             "holdout": [ds.rel(s.path) for s in held]}
    chosen = evaluation_samples(ds, split)
    assert {s.path for s in chosen if s.label == 0} == {s.path for s in held}
    assert sum(s.label for s in chosen) == 12
    # Another path: every image is used.
    other = tmp_path / "other"
    other.mkdir()
    for i, s in enumerate(ds.samples[-5:]):
        (other / f"{i}_{s.path.name}").write_bytes(s.path.read_bytes())
    assert len(evaluation_samples(discover(other), split)) == 5
    # Pointing at the training folder itself: training images are left out, with a count; the held-out remain.
    with pytest.warns(UserWarning, match=f"and {len(train) - 1} more\\) was used to train the model"):
        rest = evaluation_samples(discover(folder_dir / "normal"), split)
    assert sorted(s.path.name for s in rest) == sorted(s.path.name for s in held)


def _pillow_decode(prep: Preprocessing, source) -> np.ndarray:
    """What Preprocessing.decode gives through Pillow alone, (C, H, W)."""
    arr = np.asarray(prep.image(source), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


@pytest.mark.parametrize("channels", [3, 1])
def test_png_fast_path_gives_pillows_pixels(tmp_path, channels):
    """Plain 8-bit PNGs go through libspng, every other kind through Pillow; either way the same pixels."""
    from insightad.data.images import fast_png

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cases = {"rgb": Image.fromarray(rgb), "gray": Image.fromarray(rgb[..., 0]),
             "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "palette": Image.fromarray(rgb).quantize(17),
             "gray16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}
    prep = Preprocessing(channels=channels)
    fast = {"rgb": channels == 3, "gray": True, "rgba": False, "palette": False, "gray16": False}
    for name, img in cases.items():
        path = tmp_path / f"{name}.png"
        img.save(path)
        for source in (path, str(path), path.read_bytes()):
            assert (fast_png(source, channels) is not None) == fast[name], name
            got = prep.decode(source)
            np.testing.assert_array_equal(got, _pillow_decode(prep, source), err_msg=name)
            assert got.shape == (channels, 37, 53) and got.dtype == np.uint8
    keyed = tmp_path / "trns.png"
    Image.fromarray(rgb).save(keyed, transparency=(1, 2, 3))  # a tRNS chunk: Pillow's path
    assert fast_png(keyed, 3) is None


def test_png_fast_path_leaves_errors_and_limits_to_pillow(tmp_path):
    from insightad.data.images import fast_png

    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert fast_png(path, 3) is None
    with pytest.raises(InsightADError, match="cut.png: unreadable or truncated image"):
        Preprocessing().decode(path)
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(big)
    assert fast_png(big, 3, max_pixels=1199) is None and fast_png(big, 3, max_pixels=1200) is not None
    for engine_input in (Preprocessing().decode, Preprocessing().load):  # the caller's limit, either path
        with pytest.raises(InsightADError, match="big.png: image too large: more than the limit of 1199 pixels"):
            engine_input(big, 1199)
    assert Preprocessing().decode(big, 1200).shape == (3, 30, 40)
    assert fast_png(tmp_path / "missing.png", 3) is None
    jpeg = tmp_path / "photo.png"  # a JPEG whatever its name: Pillow's path
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    assert fast_png(jpeg, 3) is None and Preprocessing().decode(jpeg).shape == (3, 8, 8)
