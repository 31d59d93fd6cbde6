"""Issue 12 point 30: an output never destroys an input. batch --csv, export --out and train --out refuse a name
that is the model, the input list, an input image or the results table; output folders (batch --maps/--overlays,
evaluate --report, predict --overlay/--heatmap, sort/augment --out) refuse to lie inside an input folder;
unwritable outputs are refused up front in one line; predict names heatmaps as it names overlays; augment
checks every input before writing and copies originals byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from tests.conftest import good_test_images

pytest.importorskip("pyarrow")


def _png(path: Path, seed: int, size: int = 32, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, **kw)
    return path


@pytest.fixture
def test_dir(mvtec_dir, tmp_path) -> Path:
    return good_test_images(mvtec_dir, tmp_path / "test", 2, prefix="t")


def _refused(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# ----------------------------------------------------------------------------- 1. batch
@pytest.mark.parametrize("victim", ["out", "model", "list", "image"])
def test_p30_batch_csv_never_overwrites_an_input(victim, baseline_model, test_dir, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    listing = tmp_path / "paths.csv"  # a list file whose name passes the .csv check
    listing.write_text("".join(f"{p}\n" for p in sorted(test_dir.glob("*.png"))))
    out = tmp_path / "bo" / "r.parquet"
    source = str(listing) if victim == "list" else str(test_dir)
    target = {"out": out, "model": model, "list": listing, "image": test_dir / "t0.png"}[victim]
    if victim == "out":
        assert main(["batch", "--model", str(model), "--input", source, "--out", str(out)]) == 0
        capsys.readouterr()
    before = target.read_bytes()
    _refused(capsys, ["batch", "--model", str(model), "--input", source, "--out", str(out), "--csv", str(target)],
             "--csv")
    assert target.read_bytes() == before


def test_p30_batch_csv_inside_input_folder_and_same_as_out(baseline_model, test_dir, tmp_path, capsys):
    base = ["batch", "--model", str(baseline_model), "--input", str(test_dir)]
    _refused(capsys, [*base, "--out", str(tmp_path / "r.parquet"), "--csv", str(test_dir / "r.csv")],
             "--csv", "inside the input folder")
    _refused(capsys, [*base, "--out", str(tmp_path / "r.csv"), "--csv", str(tmp_path / "r.csv")], "--csv", "--out")
    assert not (tmp_path / "r.csv").exists() and not (test_dir / "r.csv").exists()


@pytest.mark.parametrize("flag", ["--maps", "--overlays"])
def test_p30_batch_folders_inside_input_refused(flag, baseline_model, test_dir, tmp_path, capsys):
    _refused(capsys, ["batch", "--model", str(baseline_model), "--input", str(test_dir), "--out",
                      str(tmp_path / "r.parquet"), flag, str(test_dir / "extra")], flag, "inside the input folder")
    assert not (test_dir / "extra").exists() and not (tmp_path / "r.parquet").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("flag", ["--out", "--csv"])
def test_p30_batch_unwritable_outputs_refused_up_front(flag, baseline_model, test_dir, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    args = {"--out": str(out), "--csv": None}
    args[flag] = "/proc/foo.parquet" if flag == "--out" else "/proc/foo.csv"
    argv = ["batch", "--model", str(baseline_model), "--input", str(test_dir), "--out", args["--out"]]
    if args["--csv"]:
        argv += ["--csv", args["--csv"]]
    _refused(capsys, argv, flag, "cannot be written")
    assert not out.exists() and not out.with_name("r.parquet.parts").exists()


# ----------------------------------------------------------------------------- 2. export
def test_p30_export_refuses_the_model_and_non_onnx_names(baseline_model, tmp_path, capsys):
    model = tmp_path / "mc.safetensors"
    shutil.copy(baseline_model, model)
    image = _png(tmp_path / "victim.png", 0)
    before, img_before = model.read_bytes(), image.read_bytes()
    _refused(capsys, ["export", "--model", str(model), "--out", str(model)], "--out", ".onnx")
    _refused(capsys, ["export", "--model", str(model), "--out", str(image)], "--out", ".onnx")
    graph = tmp_path / "mc.onnx"
    graph.symlink_to(model)  # an .onnx name that is the model file itself: read as the model file it is (p45)
    _refused(capsys, ["export", "--model", str(graph), "--out", str(graph)], "an input of this run")
    assert model.read_bytes() == before and image.read_bytes() == img_before


# ----------------------------------------------------------------------------- 3. train
def test_p30_train_out_inside_data_or_onnx_refused(mvtec_dir, tmp_path, capsys):
    flat = tmp_path / "flat"
    shutil.copytree(mvtec_dir / "train" / "good", flat)
    victim = sorted(flat.glob("*.png"))[0]
    before = victim.read_bytes()
    base = ["train", "--method", "baseline", "--data", str(flat), "--image-size", "32", "--no-onnx"]
    _refused(capsys, [*base, "--out", str(victim)], "--out", "the image name")
    assert victim.read_bytes() == before
    svdd = ["train", "--method", "svdd", "--data", str(flat), "--out", str(flat / "models" / "s.safetensors")]
    _refused(capsys, svdd, "--checkpoint-dir", "inside the input folder")  # its curves.png would become data
    graph = tmp_path / "m_base.onnx"
    graph.write_bytes(b"graph")
    _refused(capsys, [*base, "--out", str(graph)], "--out", ".onnx")
    assert graph.read_bytes() == b"graph"
    assert main([*base, "--out", str(tmp_path / "ae.st")]) == 0  # any other model name is fine
    inside = flat / "models" / "m.safetensors"  # 'cd data && insightad train --data .': models/ inside, fine
    assert main([*base, "--out", str(inside)]) == 0 and inside.is_file()


# ----------------------------------------------------------------------------- 4. evaluate, predict
def test_p30_evaluate_report_inside_data_refused(baseline_model, mvtec_dir, tmp_path, capsys):
    data = tmp_path / "ds2"
    shutil.copytree(mvtec_dir / "test", data / "test")
    rep = data / "test" / "good" / "rep"
    _refused(capsys, ["evaluate", "--model", str(baseline_model), "--data", str(data), "--report", str(rep)],
             "--report", "inside the input folder")
    assert not rep.exists()


@pytest.mark.parametrize("flag", ["--overlay", "--heatmap"])
def test_p30_predict_output_inside_input_refused(flag, baseline_model, test_dir, capsys):
    _refused(capsys, ["predict", "--model", str(baseline_model), str(test_dir), flag, str(test_dir / "o")],
             flag, "inside the input folder")
    assert not (test_dir / "o").exists()


# ----------------------------------------------------------------------------- 5. sort
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_p30_sort_unwritable_out_refused(baseline_model, test_dir, capsys):
    _refused(capsys, ["sort", "--model", str(baseline_model), "--input", str(test_dir), "--out", "/proc/s"],
             "--out", "cannot be written")


# ----------------------------------------------------------------------------- 6. predict names
def test_p30_heatmaps_named_as_overlays(mvtec_dir, tmp_path, capsys):
    from insightad.render.names import output_names

    coll = tmp_path / "coll"
    for i, rel in enumerate(["a/x.png", "b/x.png", "a/x.jpg"]):
        _png(coll / rel, i, 96)
    model = tmp_path / "padim.safetensors"
    assert main(["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--no-onnx",
                 "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(coll), "--overlay", str(tmp_path / "ov"),
                 "--heatmap", str(tmp_path / "hm")]) == 0
    overlays = sorted(p.name for p in (tmp_path / "ov").iterdir())
    heatmaps = sorted(p.name for p in (tmp_path / "hm").iterdir())
    assert len(heatmaps) == 3 and [n.replace("_heatmap", "_overlay") for n in heatmaps] == overlays
    paths = [coll / "a/x.jpg", coll / "a/x.png", coll / "b/x.png"]
    assert output_names(paths, "heatmap") == ["x_heatmap.png", "a_x_heatmap.png", "b_x_heatmap.png"]


# ----------------------------------------------------------------------------- 7. augment
def test_p30_augment_checks_every_input_before_writing(tmp_path, capsys):
    src = tmp_path / "a2"
    _png(src / "a.png", 0)
    (src / "b.png").write_bytes(b"")
    _png(src / "c.png", 2)
    out = tmp_path / "a2o"
    _refused(capsys, ["augment", "--input", str(src), "--out", str(out), "--copies", "2"], "b.png", "nothing was written")
    assert not out.exists() or not any(out.rglob("*"))


def test_p30_augment_originals_copied_byte_for_byte(tmp_path, capsys):
    src = tmp_path / "orig"
    src.mkdir()
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(src / "deep.png")
    _png(src / "photo.jpg", 1, quality=97)
    Image.new("CMYK", (32, 32), (10, 200, 30, 5)).save(src / "cmyk.jpg")
    out = tmp_path / "out"
    assert main(["augment", "--input", str(src), "--out", str(out), "--copies", "1", "--include-originals"]) == 0
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
        assert (out / f"{p.stem}_aug000{p.suffix}").exists()


def test_p30_augment_out_inside_input_refused(tmp_path, capsys):
    src = tmp_path / "a3"
    _png(src / "a.png", 0)
    _refused(capsys, ["augment", "--input", str(src), "--out", str(src / "aug")], "--out", "inside the input folder")
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]
