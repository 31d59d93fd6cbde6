"""Hardening p38: two spellings of one flag with different values refused (sort's --sort_out is the input);
sort reruns keep one current copy and one row per image; batch reruns write newly asked-for overlays;
calibrate --labels compares rows by content; evaluate includes normals added after training."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from insightad.apps.sort import CSV_NAME
from insightad.cli import main

BROKEN = b"\x89PNG\r\n\x1a\n not really"


def test_p38_two_spellings_with_different_values_are_refused(baseline_model, mvtec_dir, tmp_path, capsys):
    inc, dest = tmp_path / "inc", tmp_path / "out9"
    inc.mkdir()
    dest.mkdir()
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", inc / "a.png")
    shutil.copy(mvtec_dir / "test" / "good" / "001.png", dest / "b.png")
    code = main(["sort", "--model", str(baseline_model), "--input", str(inc), "--sort-out", str(dest), "--move"])
    err = capsys.readouterr().err
    assert code == 1 and "--input and --sort-out" in err and err.count("\n") == 1
    assert (dest / "b.png").is_file() and (inc / "a.png").is_file()  # nothing moved out of either folder
    assert main(["sort", "--model", str(baseline_model), "--sort_out", str(inc), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").rglob("a.png"))) == 1  # alone, the old script's name is still the input
    assert main(["batch", "--model", str(baseline_model), "--input", str(inc), "--out", str(tmp_path / "r.parquet"),
                 "--progress", "--no-progress"]) == 1
    assert "--progress and --no-progress" in capsys.readouterr().err
    code = main(["calibrate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--out", str(tmp_path / "a.json"),
                 "--output", str(tmp_path / "b.json")])
    assert code == 1 and "--out and --output" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_p38_sort_rerun_keeps_one_current_copy_and_row(baseline_model, mvtec_dir, tmp_path, capsys):
    inc, out = tmp_path / "inc", tmp_path / "sorted"
    inc.mkdir()
    shutil.copy(mvtec_dir / "test" / "crack" / "000.png", inc / "a00.png")
    shutil.copy(mvtec_dir / "test" / "good" / "001.png", inc / "g.png")
    (inc / "bad.png").write_bytes(BROKEN)
    args = ["sort", "--model", str(baseline_model), "--input", str(inc), "--out", str(out)]
    assert main(args) == 1
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", inc / "a00.png")  # replaced by another image
    shutil.copy(mvtec_dir / "test" / "good" / "002.png", inc / "bad.png")  # fixed
    capsys.readouterr()
    assert main(args) == 0
    assert "removed 1 earlier copies" in capsys.readouterr().out
    with open(out / CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == ["a00.png", "bad.png", "g.png"]  # one row each
    assert all(r["decision"] != "error" for r in rows)
    copies = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted(r["destination"] for r in rows) == copies  # only current copies, each with its row
    a00 = next(r for r in rows if r["path"].endswith("a00.png"))
    assert (out / a00["destination"]).read_bytes() == (inc / "a00.png").read_bytes()
    assert main(args) == 0 and "skipped 3 images" in capsys.readouterr().out  # and a third run has nothing to do


def test_p38_batch_rerun_writes_newly_asked_overlays(baseline_model, mvtec_dir, tmp_path, capsys):
    inc, res, ov = tmp_path / "inc", tmp_path / "r.parquet", tmp_path / "ov2"
    inc.mkdir()
    for n in ("000", "001"):
        shutil.copy(mvtec_dir / "test" / "good" / f"{n}.png", inc / f"{n}.png")
    base = ["batch", "--model", str(baseline_model), "--input", str(inc), "--out", str(res), "--json"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--overlays", str(ov)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["refreshed"] == 2 and summary["skipped"] == 0
    assert sorted(p.name for p in ov.iterdir()) == ["000.png.overlay.png", "001.png.overlay.png"]
    assert main([*base, "--overlays", str(ov)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2  # written now: nothing to redo


def test_p38_labels_contradicting_by_content_are_refused(baseline_model, mvtec_dir, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    lab = tmp_path / "lab"
    (lab / "other").mkdir(parents=True)
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", lab / "h.png")
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", lab / "other" / "n00.png")
    shutil.copy(mvtec_dir / "test" / "crack" / "000.png", lab / "c.png")
    (lab / "labels.csv").write_text("path,label\nh.png,normal\nc.png,anomalous\nother/n00.png,anomalous\n")
    before = model.read_bytes()
    assert main(["calibrate", "--model", str(model), "--labels", str(lab / "labels.csv")]) == 1
    err = capsys.readouterr().err
    assert "identical content" in err and "h.png" in err and "n00.png" in err and err.count("\n") == 1
    assert model.read_bytes() == before


def test_p38_evaluate_includes_normals_added_after_training(folder_dir, tmp_path, capsys):
    from insightad.data.synthetic import make_image

    model = tmp_path / "m.safetensors"
    assert main(["train", "--method", "baseline", "--data", str(folder_dir), "--image-size", "32",
                 "--out", str(model)]) == 0
    copy = tmp_path / "dscopy"
    shutil.copytree(folder_dir, copy)
    normal = next(d for d in copy.iterdir() if d.is_dir() and d.name.lower().startswith("normal"))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(copy), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["n_normal"]
    for i in range(3):
        make_image("plate", size=96, seed=900 + i)[0].save(normal / f"new{i}.png")
    assert main(["evaluate", "--model", str(model), "--data", str(copy), "--json"]) == 0
    text = capsys.readouterr()
    assert json.loads(text.out)["n_normal"] == before + 3
    assert "3 normal images not in the model's split" in text.err
