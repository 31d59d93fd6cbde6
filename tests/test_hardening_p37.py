"""Issue 12 point 37: output names never destroy or shadow an input. predict --overlay/--heatmap refuse a folder
that is, holds or lies inside an input file's folder, and every file name that is an existing folder or on the way
to the other output folder, before scoring; batch --maps/--overlays refuse the folders of listed or globbed images,
--out, --csv and the model; augment --include-originals never lets an original and a copy share a name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from tests.mapdetector import map_model  # noqa: F401  (fixture)


def _png(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _refused(capsys, argv: list, *words: str) -> str:
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# ----------------------------------------------------------------------------- 1. predict
@pytest.mark.parametrize("kind", ["overlay", "heatmap"])
def test_p37_predict_never_overwrites_an_input_of_the_generated_name(kind, baseline_model, map_model, tmp_path,
                                                                     capsys):
    model = baseline_model if kind == "overlay" else map_model
    a = _png(tmp_path / "in" / "a.png", 1)
    victim = _png(tmp_path / "ovz" / f"a_{kind}.png", 2)
    before = victim.read_bytes()
    _refused(capsys, ["predict", "--model", model, a, victim, f"--{kind}", tmp_path / "ovz"], f"--{kind}", "ovz")
    assert victim.read_bytes() == before


def test_p37_predict_output_not_inside_an_input_files_folder(baseline_model, tmp_path, capsys):
    scratch = tmp_path / "ds" / "abnormal" / "scratch"
    a = _png(scratch / "000.png", 1)
    _refused(capsys, ["predict", "--model", baseline_model, a, "--overlay", scratch / "ov"], "--overlay", "scratch")
    assert sorted(p.name for p in scratch.iterdir()) == ["000.png"]
    _refused(capsys, ["predict", "--model", baseline_model, a, "--overlay", tmp_path / "ds"], "--overlay", "hold")


def test_p37_predict_output_name_that_is_a_folder_refused_before_scoring(baseline_model, tmp_path, capsys):
    x = _png(tmp_path / "in" / "x_a.png", 1)
    (tmp_path / "ovh" / "x_a_overlay.png").mkdir(parents=True)
    _refused(capsys, ["predict", "--model", baseline_model, x, "--overlay", tmp_path / "ovh"],
             "x_a_overlay.png", "--overlay", "folder")


@pytest.mark.parametrize("flags", [("--heatmap", "", "--overlay", "x_a_heatmap.png"),
                                   ("--overlay", "", "--heatmap", "x_a_overlay.png")])
def test_p37_predict_overlay_and_heatmap_folders_not_in_each_others_way(flags, map_model, tmp_path, capsys):
    x = _png(tmp_path / "in" / "x_a.png", 1)
    q = tmp_path / "ovq"
    f1, n1, f2, n2 = flags
    _refused(capsys, ["predict", "--model", map_model, x, f1, q / n1, f2, q / n2], f1, f2, "apart")
    assert not q.exists()  # refused before any work: nothing created


# ----------------------------------------------------------------------------- 2. batch
@pytest.fixture
def listed(tmp_path) -> tuple[Path, Path]:
    a = _png(tmp_path / "in" / "a.png", 1)
    victim = _png(tmp_path / "ovb" / "a.png.overlay.png", 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{a}\n{victim}\n")
    return listing, victim


@pytest.mark.parametrize("flag", ["--overlays", "--maps"])
def test_p37_batch_folder_of_a_listed_image_refused(flag, listed, map_model, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    listing, victim = listed
    before = victim.read_bytes()
    _refused(capsys, ["batch", "--model", map_model, "--input", listing, "--out", tmp_path / "rb.parquet",
                      flag, tmp_path / "ovb"], flag, "ovb")
    _refused(capsys, ["batch", "--model", map_model, "--input", f"{tmp_path}/ovb/*.png", "--out",
                      tmp_path / "rb.parquet", flag, tmp_path / "ovb"], flag, "ovb")
    assert victim.read_bytes() == before and not (tmp_path / "rb.parquet").exists()


def test_p37_batch_never_writes_into_a_training_folder(baseline_model, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    normal = tmp_path / "ds" / "normal"
    x = _png(normal / "x.png", 1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{x}\n")
    _refused(capsys, ["batch", "--model", baseline_model, "--input", listing, "--out", tmp_path / "r.parquet",
                      "--overlays", normal], "--overlays", "normal")
    assert sorted(p.name for p in normal.iterdir()) == ["x.png"]


@pytest.mark.parametrize("which", ["out", "csv", "model"])
def test_p37_batch_maps_is_not_out_csv_or_model(which, map_model, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "in"
    _png(folder / "a.png", 1)
    out, csv = tmp_path / "r.parquet", tmp_path / "r2.csv"
    target = {"out": out, "csv": csv, "model": map_model}[which]
    _refused(capsys, ["batch", "--model", map_model, "--input", folder, "--out", out, "--csv", csv,
                      "--maps", target], "--maps", which if which != "model" else "the model")
    assert not out.exists() and not csv.exists()


# ----------------------------------------------------------------------------- 3. augment
def test_p37_augment_original_and_copy_never_share_a_name(tmp_path, capsys):
    src = tmp_path / "ah"
    x, taken = _png(src / "x.png", 1), _png(src / "x_aug000.png", 2)
    out = tmp_path / "ahout"
    assert main(["augment", "--input", str(src), "--out", str(out), "--copies", "1", "--include-originals"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert f"wrote {len(files)} images" in capsys.readouterr().out and len(files) == 4
    assert (out / "x.png").read_bytes() == x.read_bytes()
    assert (out / "x_aug000.png").read_bytes() == taken.read_bytes()
