"""Hardening p54: ``insightad evaluate`` (reports, pixel metrics, masks) and the train report against a demanding
user's inputs.

Found and fixed:

- colour and palette masks were read through their 8-bit luma: a dark mark (RGB (1, 0, 0), (0, 0, 2), a dark
  blue) had luma 0 and its defect left the pixel metrics unsaid; a transparent background that holds white (as
  editors write it) would have been all defect. Now any non-zero colour channel is a defect, a fully transparent
  pixel never (``data.images.mask_pixels``; README); a PNG of 16 bits a colour channel is read at 16 bits (Pillow
  read it as 8: label 1 became 0);
- an anomalous image whose mask marks nothing was counted as defect-free, blaming the map for finding its defect;
  now it is left out of the pixel metrics with a warning and counted (``pixel_images_empty_mask``);
- a mask drawn black on white (inverted) read as all defect, and the pixel metrics came out poor without a hint;
  a mask marking over 95% of its image is now said;
- images of 1-8 px were enlarged to the model's 64 px and scored without a word; images over 4 times smaller than
  the model's working size are now said;
- two anomalous images of one name in two defect folders took one flat ``masks/<stem>_mask.png`` between them
  without a word (or the first of two masks of one name); now neither gets one, in one warning line, and the mask
  is not called an orphan;
- a test set of normal images only (or defective only) printed a blank line for the balanced/unbalanced figures and
  report.md left them out unsaid; now both say n/a and why;
- the train report of a validation of 1-5 normals: the examples sheet kept blank columns for examples that did
  not exist, and the colour bar labelled every tick '632' (a narrow spread about a large level); the recall per
  kind showed one kind (cutpaste) as if it were the whole picture. Each fold made its defects from the first kind
  again, so folds of 1-5 normals never made the last kinds (20 normals, 5 folds: no blob, no missing piece); the
  folds now take the kinds in turn, and a validation that still misses some says which in a warning (train output,
  report.md, decision.json ``untried_kinds``).

Checked and found sound: masks of the wrong size (p24), missing masks (p47), 16-bit/float gray masks (p41), a test
set of defects only (p41), --report into a file or below one, an ONNX export and its model file giving the same
metrics on the same data, a truncated mask (one line naming it, no report written).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from insightad.data.images import load_mask
from insightad.data.layouts import Sample, discover

from .conftest import SIZE


def _rgb(size: int = 16, mark: tuple[int, ...] = (1, 0, 0), background: tuple[int, ...] = (0, 0, 0)) -> np.ndarray:
    a = np.zeros((size, size, len(background)), np.uint8)
    a[...] = background
    a[4:8, 4:8] = mark
    return a


def _palette(transparent: bool) -> Image.Image:
    """A palette mask: entry 0 the background (white and transparent, or black), entry 1 a dark blue mark."""
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 255, 255, 0, 0, 40] if transparent else [0, 0, 0, 0, 0, 40])
    img.paste(1, (4, 4, 8, 8))
    if transparent:
        img.info["transparency"] = 0
    return img


@pytest.mark.parametrize("name, image", [
    ("red_1", Image.fromarray(_rgb(mark=(1, 0, 0)))),
    ("blue_2", Image.fromarray(_rgb(mark=(0, 0, 2)))),
    ("dark_blue", Image.fromarray(_rgb(mark=(0, 0, 60)))),
    ("rgba_transparent_white", Image.fromarray(_rgb(mark=(0, 0, 1, 255), background=(255, 255, 255, 0)))),
    ("rgba_opaque_black", Image.fromarray(_rgb(mark=(0, 1, 0, 255), background=(0, 0, 0, 255)))),
    ("palette", _palette(transparent=False)),
    ("palette_transparent", _palette(transparent=True)),
])
def test_p54_colour_masks_keep_dark_marks(name, image, tmp_path):
    """Every mark is the 4x4 square, whatever its colour; a transparent background is no defect."""
    path = tmp_path / f"{name}_mask.png"
    image.save(path, **({"transparency": 0} if name == "palette_transparent" else {}))
    mask = load_mask(path, (16, 16))
    assert mask.sum() == 16 and mask[4:8, 4:8].all(), name


def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A PNG of 16 bits per channel (RGB or RGBA), written by hand: Pillow cannot write one."""
    import struct
    import zlib

    h, w, c = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("channels", [3, 4])
def test_p54_sixteen_bit_colour_masks_keep_label_one(channels, tmp_path):
    """Pillow reads 16 bits a channel as 8: a colour mask of label 1 (1/65535) was all 0."""
    pixels = np.zeros((16, 16, channels), np.uint16)
    pixels[4:8, 4:8, 0] = 1
    if channels == 4:
        pixels[4:8, 4:8, 3] = 65535
        pixels[:4, :, :3] = 65535  # white under alpha 0: no defect
    assert load_mask(_png16(tmp_path / "m_mask.png", pixels), (16, 16)).sum() == 16


def test_p54_a_dark_colour_mask_counts_in_the_pixel_metrics(tmp_path):
    from insightad.evaluate.pixel import pixel_metrics

    Image.fromarray(_rgb(mark=(0, 0, 2))).save(tmp_path / "d_mask.png")
    samples = [Sample(tmp_path / "d.png", 1, "scratch", "test", tmp_path / "d_mask.png"),
               Sample(tmp_path / "ok.png", 0, "good", "test")]
    perfect = np.zeros((16, 16))
    perfect[4:8, 4:8] = 1.0
    out = pixel_metrics(samples, [perfect, np.zeros((16, 16))], resolution=16)
    assert out["defect_regions"] == 1 and out["pixel_auroc"] == pytest.approx(1.0)


def test_p54_an_empty_mask_of_a_defective_image_is_left_out_and_said(tmp_path):
    from insightad.cli.evaluate import format_table
    from insightad.evaluate.metrics import image_metrics
    from insightad.evaluate.pixel import pixel_metrics

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a_mask.png")
    Image.fromarray(_rgb(mark=(255, 255, 255))[..., 0]).save(tmp_path / "b_mask.png")
    samples = [Sample(tmp_path / "a.png", 1, "scratch", "test", tmp_path / "a_mask.png"),
               Sample(tmp_path / "b.png", 1, "scratch", "test", tmp_path / "b_mask.png"),
               Sample(tmp_path / "ok.png", 0, "good", "test")]
    found = np.zeros((16, 16))
    found[4:8, 4:8] = 1.0
    with pytest.warns(UserWarning, match=r"1 anomalous images have a mask with no defect pixel at the 16 px "
                                         r"comparison \(e.g. .*a_mask.png\): the pixel metrics leave them out"):
        out = pixel_metrics(samples, [np.ones((16, 16)), found, np.zeros((16, 16))], resolution=16)
    assert out["pixel_images"] == 2 and out["pixel_images_skipped"] == 1 and out["pixel_images_empty_mask"] == 1
    assert out["pixel_auroc"] == pytest.approx(1.0)  # before: a's found defect counted as 256 false alarms
    m = {**image_metrics(np.array([1, 1, 0]), np.array([2.0, 2.0, 1.0]), 1.5), **out}
    assert ("pixel_images       2 images judged pixel by pixel; 1 anomalous images whose mask marks no defect "
            "pixel left out") in format_table(m)


def _folder_with_duplicate_names(mvtec_dir: Path, root: Path, per_defect_masks: bool) -> Path:
    """normal/ and abnormal/{crack,scratch}/000.png; masks flat (masks/000_mask.png) or per defect."""
    shutil.copytree(mvtec_dir / "test" / "good", root / "normal")
    for defect in ("crack", "scratch"):
        (root / "abnormal" / defect).mkdir(parents=True)
        shutil.copy(mvtec_dir / "test" / defect / "000.png", root / "abnormal" / defect / "000.png")
        if per_defect_masks:
            (root / "masks" / defect).mkdir(parents=True)
            shutil.copy(mvtec_dir / "ground_truth" / defect / "000_mask.png", root / "masks" / defect)
    if not per_defect_masks:
        (root / "masks").mkdir()
        shutil.copy(mvtec_dir / "ground_truth" / "crack" / "000_mask.png", root / "masks")
    return root


def test_p54_one_flat_mask_for_two_images_of_one_name_goes_to_neither(mvtec_dir, tmp_path):
    root = _folder_with_duplicate_names(mvtec_dir, tmp_path / "d", per_defect_masks=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = discover(root)
    said = [str(w.message) for w in caught]
    assert any("2 anomalous images of" in s and "cannot be matched to one mask (e.g. abnormal/crack/000.png: '000' "
               "names 1 mask files and 2 images)" in s for s in said), said
    assert not any("belong to no anomalous image" in s for s in said)  # said once, not called an orphan too
    assert [s.mask for s in ds.samples if s.label] == [None, None]


def test_p54_per_defect_masks_of_one_name_each_find_their_own(mvtec_dir, tmp_path):
    root = _folder_with_duplicate_names(mvtec_dir, tmp_path / "d", per_defect_masks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = discover(root)
    assert {s.defect: s.mask.parent.name for s in ds.samples if s.label} == {"crack": "crack", "scratch": "scratch"}


def test_p54_two_masks_of_one_name_in_an_mvtec_folder_go_to_neither_image(mvtec_dir, tmp_path):
    root = tmp_path / "cat"
    shutil.copytree(mvtec_dir, root)
    shutil.copy(root / "test" / "crack" / "000.png", root / "test" / "crack" / "000.tif")  # 000.png and 000.tif
    with pytest.warns(UserWarning, match="cannot be matched to one mask"):
        ds = discover(root)
    assert [s.mask for s in ds.samples if s.path.stem == "000" and s.defect == "crack"] == [None, None]


def test_p54_a_test_set_of_normal_images_says_why_balanced_is_na(baseline_model, mvtec_dir, tmp_path, capsys):
    data = tmp_path / "cat"
    shutil.copytree(mvtec_dir / "train", data / "train")
    shutil.copytree(mvtec_dir / "test" / "good", data / "test" / "good")
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--report", str(report),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "image_auroc        n/a (needs normal and anomalous images)" in out
    assert "[Balanced] n/a (needs both normal and defective images)" in out and "\n\n" not in out
    assert "## Balanced and unbalanced\n\n- n/a (needs both normal and defective images)" in \
        (report / "report.md").read_text()


def test_p54_colour_bar_ticks_are_told_apart():
    from insightad.render.colormap import TICKS, MapScale, tick_labels

    narrow = MapScale(632.0959, 0.0431)  # PaDiM validated on 2 normals: labels were '632' five times
    labels = tick_labels([narrow.value_at(v) for v in TICKS])
    assert len(set(labels)) == len(TICKS) and labels[2] == "632.1"
    assert tick_labels([1.0, 2.0, 3.5]) == ["1", "2", "3.5"]  # 3 digits where they do


def test_p54_validation_folds_take_the_defect_kinds_in_turn(mvtec_dir):
    """20 normals in 5 folds of 4: each fold began at the first kind, so blob and missing were never made."""
    from insightad.data.defects import DEFECT_KINDS
    from insightad.methods import create_detector
    from insightad.methods.crossfit import out_of_fold, untried_kinds

    paths = [s.path for s in discover(mvtec_dir).train][:20]
    det = create_detector("baseline", image_size=SIZE, fit_engine="torch").fit(paths)
    oof = out_of_fold(det, paths, k=5, seed=0)
    assert set(oof.defect_kinds) == set(DEFECT_KINDS) and untried_kinds(oof.defect_kinds) == []


def test_p54_train_report_of_three_normals_says_which_kinds_were_never_tried(tmp_path, capsys):
    from insightad.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "few", kind="disc", layout="mvtec", n_train=3, n_test_good=1, n_per_defect=1,
                         size=SIZE, seed=1)
    report = tmp_path / "report"
    assert main(["train", "--data", str(data), "--method", "baseline", "--image-size", str(SIZE), "--out",
                 str(tmp_path / "m.safetensors"), "--report", str(report), "--no-progress", "--no-onnx"]) == 0
    said = ("only 3 synthetic defects (cutpaste, texture, crack) on 3 validation normals: scratch, blob, missing "
            "never tried, so the recall says nothing about them (train on more normal images)")
    assert f"insightad: warning: {said}" in capsys.readouterr().err
    assert f"- warning: {said}" in (report / "report.md").read_text()
    body = json.loads((report / "decision.json").read_text())
    assert body["untried_kinds"] == ["scratch", "blob", "missing"]
    with Image.open(report / "synthetic_examples.png") as sheet:  # one example of each of 3 kinds: no blank columns
        assert sheet.size == (128, 3 * (128 + 14))


def test_p54_examples_sheet_without_any_kept_image_is_not_drawn(tmp_path):
    from insightad.apps.train_report import example_sheet
    from insightad.data.defects import SyntheticDefect

    bare = [SyntheticDefect(np.empty((0,), np.uint8), np.zeros((8, 8), bool), "blob", 0)]
    oof = SimpleNamespace(defects=bare, defect_maps=None, defect_scores=np.array([1.0]))
    det = SimpleNamespace(threshold_=0.5, threshold_info_={})
    assert example_sheet(det, oof, tmp_path / "examples.png") is None and not (tmp_path / "examples.png").exists()


def test_p54_images_far_smaller_than_the_model_are_said(baseline_model, tmp_path, capsys):
    """Images of 1-8 px were enlarged to the model's 64 px and scored without a word."""
    rng = np.random.default_rng(0)
    for folder, side in (("normal", 1), ("normal", 8), ("abnormal", 2), ("abnormal", 64)):
        (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "d" / folder / f"x{side}.png")
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(tmp_path / "d"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: 3 of 4 images are over 4 times smaller than the model's {SIZE}x{SIZE} working size (e.g. "
            f"{tmp_path / 'd' / 'normal' / 'x1.png'}, 1x1): they are enlarged to be scored") in err


def test_p54_an_inverted_mask_is_said(tmp_path):
    """A mask drawn black on white reads as all defect: pixel metrics came out poor without a hint why."""
    from insightad.evaluate.pixel import pixel_metrics

    inverted = np.full((16, 16), 255, np.uint8)
    inverted[4:6, 4:6] = 0  # 98% of the image
    Image.fromarray(inverted).save(tmp_path / "d_mask.png")
    samples = [Sample(tmp_path / "d.png", 1, "scratch", "test", tmp_path / "d_mask.png"),
               Sample(tmp_path / "ok.png", 0, "good", "test")]
    with pytest.warns(UserWarning, match=r"1 of 1 masks mark over 95% of their image as defect \(e.g. .*d_mask.png\): "
                                         r"a mask marks defects non-zero on a zero \(black\) background; is it inverted"):
        pixel_metrics(samples, [np.ones((16, 16)), np.zeros((16, 16))], resolution=16)


def test_p54_an_export_and_its_model_file_give_the_same_metrics(baseline_model, mvtec_dir, tmp_path, capsys):
    """evaluate of the .onnx export and of the .safetensors model on one dataset: the same images, the same figures."""
    onnx = tmp_path / "baseline.onnx"
    assert main(["export", "--model", str(baseline_model), "--out", str(onnx)]) == 0
    capsys.readouterr()
    got = {}
    for model in (baseline_model, onnx):
        assert main(["evaluate", "--model", str(model), "--data", str(mvtec_dir), "--json", "--no-progress"]) == 0
        got[model.suffix] = json.loads(capsys.readouterr().out)
    a, b = got[".safetensors"], got[".onnx"]
    assert (a["n_normal"], a["n_anomalous"]) == (b["n_normal"], b["n_anomalous"])
    for key in ("image_auroc", "average_precision", "accuracy", "f1", "threshold"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_p54_the_small_image_check_leaves_an_unreadable_file_to_the_scoring(baseline_model, mvtec_dir, tmp_path,
                                                                            capsys):
    """The check for images far below the working size read every header first: an unreadable test image was named
    as 'unreadable image (cannot identify image file ...)' there, not with what the scoring expects."""
    data = tmp_path / "disc"
    shutil.copytree(mvtec_dir, data)
    (data / "test" / "good" / "999.png").write_bytes(b"garbage")
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "999.png: not a readable image (expected PNG, JPEG, BMP or TIFF)" in err and "Traceback" not in err
