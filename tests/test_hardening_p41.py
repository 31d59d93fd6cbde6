"""Sweep of train, calibrate and evaluate on odd datasets: file names that are not UTF-8 in a report, masks
whose defect values are small or constant, negative seeds, undefined pixel metrics explained, copies of
training images named, identical training images refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main


def _odd_names_dataset(mvtec_dir: Path, root: Path) -> Path:
    """A folder-layout copy of ``mvtec_dir``'s test split whose defect folder and one image are named with bytes
    that are not UTF-8 (as a Windows-1252 or Shift-JIS camera PC writes them)."""
    shutil.copytree(mvtec_dir / "test" / "good", root / "normal")
    defect = os.path.join(os.fsencode(root / "abnormal"), b"rayure\xe9")
    os.makedirs(defect)
    for i, src in enumerate(sorted(p for d in (mvtec_dir / "test").iterdir() if d.name != "good"
                                   for p in d.glob("*.png"))[:4]):
        shutil.copy(src, os.path.join(defect, b"pi\xe8ce %d.png" % i))
    return root


def test_p41_report_with_names_that_are_not_utf8(baseline_model, mvtec_dir, tmp_path, capsys):
    data = _odd_names_dataset(mvtec_dir, tmp_path / "data")
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--report", str(report),
                 "--no-progress"]) == 0
    assert "report written to" in capsys.readouterr().out
    assert {"metrics.json", "report.md", "per_defect.csv", "worst_cases.png"} <= {p.name for p in report.iterdir()}
    assert "rayure\\xe9" in (report / "per_defect.csv").read_text(encoding="utf-8")


@pytest.mark.parametrize("array, name", [(np.uint16, "label1_16bit.png"), (np.int32, "constant_32bit.tif"),
                                         (np.float32, "constant_float.tif")])
def test_p41_masks_of_more_than_8_bits_keep_their_defects(array, name, tmp_path):
    """Any non-zero mask value is a defect: a 16-bit mask of label 1 (1/65535 of full scale) and a 32-bit or float
    mask of one value (min = max) lost every defect pixel when scaled to 8 bits first."""
    from insightad.data.layouts import Sample
    from insightad.evaluate.pixel import pixel_metrics

    values = np.zeros((32, 32), array)
    values[8:16, 8:16] = 1
    if array is not np.uint16:
        values[:] = 3  # the whole image is the defect
    mask = tmp_path / name
    Image.fromarray(values).save(mask)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "img.png")
    from insightad.data.images import load_mask

    assert load_mask(mask, (32, 32)).sum() == (64 if array is np.uint16 else 32 * 32)
    normal = tmp_path / "ok.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(normal)
    samples = [Sample(tmp_path / "img.png", 1, "d", "test", mask), Sample(normal, 0, "good", "test")]
    maps = [np.random.default_rng(0).random((32, 32)), np.random.default_rng(1).random((32, 32))]
    out = pixel_metrics(samples, maps, resolution=32)
    assert out["defect_regions"] == 1 and out["pixel_auroc"] is not None


@pytest.mark.parametrize("command", ["train", "evaluate", "calibrate"])
@pytest.mark.parametrize("seed, expected", [("-5", "seed: expected a value >= 0, got -5"),
                                            (str(2**70), "seed: expected a value <= 9223372036854775807")])
def test_p41_seed_out_of_range_is_one_line(command, seed, expected, baseline_model, mvtec_dir, tmp_path, capsys):
    """A negative seed reached NumPy's SeedSequence after the whole fit (a traceback); one above 2**64 PyTorch's.
    (A detector's own stored seed is not checked: model files written with any seed keep loading.)"""
    args = {"train": ["train", "--method", "baseline", "--image-size", "64", "--out", str(tmp_path / "m.safetensors")],
            "evaluate": ["evaluate", "--model", str(baseline_model)],
            "calibrate": ["calibrate", "--model", str(baseline_model), "--dry-run"]}[command]
    assert main([*args, "--data", str(mvtec_dir), f"--seed={seed}", "--no-progress"]) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_p41_a_detector_keeps_any_seed():
    from insightad.methods import create_detector

    assert create_detector("baseline", image_size=64, seed=-3).seed == -3  # as model files written before hold it


def test_p41_augment_names_that_are_not_utf8(tmp_path, capsys):
    """The per-image seed hashed the file name as UTF-8: a name in other bytes stopped augment with a traceback
    halfway through the folder."""
    src = tmp_path / "in"
    src.mkdir()
    for name in (b"a.png", b"caf\xe9.png"):
        Image.fromarray(np.full((24, 24, 3), 100, np.uint8)).save(os.path.join(os.fsencode(src), name))
    assert main(["augment", "--input", str(src), "--out", str(tmp_path / "out"), "--copies", "2",
                 "--no-progress"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    from insightad.apps.augment import image_seed

    assert image_seed(3, "a.png", 1) == (3 * 1_000_003 + __import__("zlib").crc32(b"a.png") * 131 + 1) % 2**63


def test_p41_pixel_metrics_of_masks_without_defects_say_why(tmp_path):
    """All-zero masks: pixel AUROC and AUPRO were 'n/a (needs normal and anomalous images)' in the table (there
    were both) and '- None' in report.md; the reason is now carried with them."""
    from insightad.cli.evaluate import format_table
    from insightad.data.layouts import Sample
    from insightad.evaluate.metrics import image_metrics
    from insightad.evaluate.pixel import pixel_metrics

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "d_mask.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "d.png")
    samples = [Sample(tmp_path / "d.png", 1, "scratch", "test", tmp_path / "d_mask.png"),
               Sample(tmp_path / "ok.png", 0, "good", "test")]
    m = image_metrics(np.array([1, 0]), np.array([2.0, 1.0]), 1.5)
    with pytest.warns(UserWarning, match="mask with no defect pixel"):  # (p54: said, and the image left out)
        m.update(pixel_metrics(samples, [np.ones((16, 16)), np.zeros((16, 16))], resolution=16))
    assert m["pixel_auroc"] is None and m["pixel_undefined"] == "the masks hold no defect pixels: all are 0"
    assert "pixel_auroc        n/a (the masks hold no defect pixels: all are 0)" in format_table(m)


def test_p41_report_of_a_test_split_of_defects_only(baseline_model, mvtec_dir, tmp_path, capsys):
    """No normal image: AUROC and average precision are both undefined (AP was 1.0 whatever the scores), and
    report.md says so instead of leaving them out."""
    data = tmp_path / "cat"
    shutil.copytree(mvtec_dir, data, ignore=shutil.ignore_patterns("good"))
    (data / "train" / "good").mkdir()
    shutil.copy(sorted((mvtec_dir / "train" / "good").glob("*.png"))[0], data / "train" / "good")
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--report", str(report),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "average_precision  n/a (needs normal and anomalous images)" in out
    md = (report / "report.md").read_text()
    assert "| image_auroc | n/a (needs normal and anomalous images) |" in md
    assert "| average_precision | n/a (needs normal and anomalous images) |" in md
    assert "- None" not in md


def _images(folder: Path, n: int, seed: int = 0, same: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = np.full((32, 32, 3), 128, np.uint8) if same else (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"n{i:02d}.png")
        paths.append(folder / f"n{i:02d}.png")
    return paths


def test_p41_identical_training_images_are_refused_before_the_fit(tmp_path, capsys):
    """Five copies of one image: PaDiM's threshold came out ~1e-12 and the model called its own training images
    anomalous. Refused in one line before anything is fitted or written."""
    _images(tmp_path / "same" / "normal", 6, same=True)
    out = tmp_path / "m.safetensors"
    assert main(["train", "--method", "padim", "--image-size", "64", "--data", str(tmp_path / "same"),
                 "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "all 5 training images have this file's content; a detector needs varied normal images" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.safetensors*"))


def test_p41_a_held_out_copy_of_a_training_image_is_named(tmp_path):
    """A dataset with a duplicate: train warns that the held-out copy cannot be evaluated, and evaluate's warning
    names the training file it copies (it said only that the held-out image 'was used to train the model'); the
    copy is left out, the rest evaluated (one duplicate refused the whole evaluation of concrete_crack, seed 0)."""
    import warnings

    from insightad.config import DataParams
    from insightad.data.layouts import check_training_content, discover, evaluation_samples, holdout_split

    paths = _images(tmp_path / "d" / "normal", 10)
    ds = discover(tmp_path / "d")
    train, held = holdout_split(ds, 0.2, 0)
    shutil.copy(train[0].path, held[0].path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hashes = check_training_content(ds, train, held)
    assert any("1 of the 2 held-out images" in str(w.message) and "is a copy of training images" in str(w.message)
               for w in caught)
    from insightad.apps.train import split_record

    split = split_record(ds, train, held, DataParams(), hashes)
    with pytest.warns(UserWarning, match="left out of the evaluation") as caught:
        chosen = evaluation_samples(ds, split)
    assert f"was used to train the model (its content, as {ds.rel(train[0].path)})" in str(caught[0].message)
    assert [s.path for s in chosen] == [held[1].path]  # the copy left out, the other held-out image evaluated
    assert len(paths) == 10


@pytest.mark.parametrize("body, message", [
    ("train = 5\n", "key 'train' names a command; expected a table [train] of its settings, got 5"),
    ('evaluate = "x"\n', "key 'evaluate' names a command; expected a table [evaluate] of its settings, got \"x\""),
    ("method = 5\n", "key 'method': expected one of autoencoder, baseline"),
    ('[train]\nmethod = "padin"\n', "key 'method': expected one of autoencoder, baseline")])
def test_p41_config_file_odd_values(body, message, mvtec_dir, tmp_path, capsys):
    """``train = 5`` crashed (AttributeError: 'int' object has no attribute 'items'); a method the config file
    misspells made every method flag 'unrecognized arguments: --image-size 64'."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    out = tmp_path / "m.safetensors"
    assert main(["train", "--config", str(cfg), "--data", str(mvtec_dir), "--image-size", "64", "--out", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}: {message}" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("n, holdout, message", [
    (1, "0.2", "1 training image; choosing the threshold scores the training images out of fold and needs at least 2 "
               "(add normal images)"),
    (2, "0.5", "1 training image (1 of the 2 normal images held out); choosing the threshold")])
def test_p41_one_training_image_is_refused_before_the_fit(n, holdout, message, tmp_path, capsys, monkeypatch):
    """One training image left: 'validation: out-of-fold scores need at least 2 training images, got 1' came after
    the fit, and did not say what to do."""
    import insightad.methods.baseline as baseline

    _images(tmp_path / "d", n)
    monkeypatch.setattr(baseline.BaselineDetector, "fit", lambda *a, **k: pytest.fail("fitted"))
    out = tmp_path / "m.safetensors"
    assert main(["train", "--method", "baseline", "--image-size", "64", "--data", str(tmp_path / "d"),
                 "--holdout", holdout, "--out", str(out), "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_p41_mvtec_images_outside_the_labelled_folders_are_named(tmp_path):
    """test/loose.png has no label in MVTec AD (the defect is its folder): it was skipped without a word."""
    import warnings

    from insightad.data.layouts import discover

    _images(tmp_path / "cat" / "train" / "good", 2)
    _images(tmp_path / "cat" / "test" / "good", 1)
    shutil.copy(tmp_path / "cat" / "test" / "good" / "n00.png", tmp_path / "cat" / "test" / "loose.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = discover(tmp_path / "cat")
    assert len(ds.test) == 1
    assert any("1 images directly in train/ or test/" in str(w.message) and "test/loose.png" in str(w.message)
               for w in caught)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_p41_symlinks_to_images_outside_the_dataset(tmp_path):
    """A dataset assembled with links (a linked normal/ folder, or one linked image) stopped with
    ValueError: '...' is not in the subpath of '...' when the split was recorded."""
    from insightad.apps.train import split_record
    from insightad.config import DataParams
    from insightad.data.layouts import discover, evaluation_samples, holdout_split

    elsewhere = _images(tmp_path / "store", 6)
    linked_folder = tmp_path / "a"
    linked_folder.mkdir()
    (linked_folder / "normal").symlink_to(tmp_path / "store")
    linked_image = tmp_path / "b" / "normal"
    _images(linked_image, 5, seed=1)
    (linked_image / "link.png").symlink_to(elsewhere[0])
    for root in (linked_folder, tmp_path / "b"):
        ds = discover(root)
        train, held = holdout_split(ds, 0.2, 0)
        split = split_record(ds, train, held, DataParams())
        assert all(not name.startswith("..") for name in split["train"] + split["holdout"])
        assert {s.path for s in evaluation_samples(ds, split)} == {s.path for s in held}


@pytest.mark.parametrize("flags, message", [
    (["--normal-dir", ""], "--normal-dir: expected the name of a folder inside"),
    (["--normal-dir", "."], "--normal-dir: expected the name of a folder inside"),
    (["--normal-dir", "../elsewhere"], "--normal-dir: expected the name of a folder inside"),
    (["--abnormal-dir", "Normal"], "--abnormal-dir: names the same folder as --normal-dir")])
def test_p41_normal_and_abnormal_folder_names(flags, message, tmp_path, capsys):
    """--normal-dir '' made the dataset root the normal folder: abnormal/ was trained on as normal, silently;
    --abnormal-dir naming the normal folder made every normal image an anomaly too."""
    _images(tmp_path / "d" / "normal", 5)
    _images(tmp_path / "d" / "abnormal", 2, seed=3)
    _images(tmp_path / "elsewhere", 3)
    out = tmp_path / "m.safetensors"
    assert main(["train", "--method", "baseline", "--image-size", "64", "--data", str(tmp_path / "d"), *flags,
                 "--out", str(out), "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_p41_a_refused_run_leaves_no_empty_output_folders(baseline_model, mvtec_dir, tmp_path, capsys):
    """The output checks create --report and the model's folder up front; a run refused after them left those
    folders behind, empty. Folders that hold anything, and those of a run that succeeds, stay."""
    data = tmp_path / "cat"
    shutil.copytree(mvtec_dir / "test", data / "test")
    first = sorted((data / "test" / "good").glob("*.png"))[0]
    (data / "test" / "good" / "cut.png").write_bytes(first.read_bytes()[:200])  # truncated
    (data / "train" / "good").mkdir(parents=True)
    shutil.copy(sorted((mvtec_dir / "train" / "good").glob("*.png"))[0], data / "train" / "good")
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(data), "--report",
                 str(tmp_path / "reports" / "run1"), "--no-progress"]) == 1
    assert "cut.png" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
    (tmp_path / "kept").mkdir()
    _images(tmp_path / "same" / "normal", 4, same=True)
    assert main(["train", "--data", str(tmp_path / "same"), "--out", str(tmp_path / "kept" / "new" / "m.safetensors"),
                 "--image-size", "64", "--no-progress"]) == 1
    assert [p.name for p in tmp_path.glob("kept/*")] == []
    assert (tmp_path / "kept").is_dir()  # it was there before the run


def test_p41_flat_folder_with_sub_folders_says_they_are_normal(tmp_path):
    """A flat folder of normal images with a bad/ folder beside them: every image, bad/ included, was taken as
    normal without a word."""
    import warnings

    from insightad.data.layouts import discover

    _images(tmp_path / "d", 3)
    _images(tmp_path / "d" / "bad", 2, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = discover(tmp_path / "d")
    assert ds.layout == "images" and len(ds.samples) == 5
    assert any("2 images in sub-folders of" in str(w.message) and "(bad)" in str(w.message) for w in caught)


@pytest.mark.parametrize("mask_name", ["d0_MASK.PNG", "d0_Mask.png"])
def test_p41_masks_named_in_another_case(mask_name, tmp_path):
    """Image extensions are matched in any case, the _mask suffix was not: abnormal/d0_MASK.PNG was scored as one
    more anomalous image, and d0.png had no mask."""
    from insightad.data.layouts import discover

    _images(tmp_path / "d" / "normal", 3)
    _images(tmp_path / "d" / "abnormal", 1)
    (tmp_path / "d" / "abnormal" / "n00.png").rename(tmp_path / "d" / "abnormal" / "d0.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "d" / "abnormal" / mask_name, format="PNG")
    anomalous = [s for s in discover(tmp_path / "d").samples if s.label == 1]
    assert [(s.path.name, s.mask.name if s.mask else None) for s in anomalous] == [("d0.png", mask_name)]


@pytest.mark.parametrize("size", ["16", "31"])
def test_p41_image_size_too_small_for_the_validation_is_refused_first(size, tmp_path, capsys, monkeypatch):
    """--image-size 16 to 31 passed the flag's check, fitted, then stopped with 'synthetic defects: expected square
    uint8 images of side >= 32', naming no flag."""
    import insightad.methods.padim as padim

    _images(tmp_path / "d", 6)
    monkeypatch.setattr(padim.PadimDetector, "fit", lambda *a, **k: pytest.fail("fitted"))
    out = tmp_path / "m.safetensors"
    assert main(["train", "--method", "padim", "--image-size", size, "--data", str(tmp_path / "d"), "--out", str(out),
                 "--no-progress"]) == 1
    assert f"--image-size: {size} px is too small to choose the threshold on" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_p41_broken_links_in_a_dataset_are_named(tmp_path):
    """A dataset copied with its links broken lost those images without a word."""
    import warnings

    from insightad.data.layouts import discover

    _images(tmp_path / "d" / "normal", 3)
    (tmp_path / "d" / "normal" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = discover(tmp_path / "d")
    assert len(ds.samples) == 3
    assert any("1 image names under" in str(w.message) and "gone.png" in str(w.message) for w in caught)


def test_p41_a_report_written_again_keeps_no_figure_of_the_earlier_one(baseline_model, mvtec_dir, tmp_path, capsys):
    """A second report into the same folder, on normal images only, left the first one's ROC and PR curves and
    balanced/unbalanced figure beside it, as if they were of these images."""
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--report", str(report),
                 "--no-progress"]) == 0
    assert (report / "roc_curve.png").exists()
    normals = tmp_path / "normals"
    shutil.copytree(mvtec_dir / "test" / "good", normals)
    (report / "notes.txt").write_text("mine")
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(normals), "--report", str(report),
                 "--no-progress"]) == 0
    capsys.readouterr()
    names = {p.name for p in report.iterdir()}
    assert not names & {"roc_curve.png", "pr_curve.png", "balanced_unbalanced.png"}
    assert {"notes.txt", "report.md", "score_histogram.png"} <= names
