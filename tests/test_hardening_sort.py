"""Issue 12 hardening, files side: sort on a shared or hostile output folder, odd file names, files that
vanish mid-run, FIFOs, and calibrate refusing an unwritable output before it changes the model."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from insightad.apps.sort import CSV_NAME, FolderSorter
from insightad.cli import main
from insightad.errors import InsightADError
from insightad.io import folder_lock
from insightad.model_file import load_model, read_metadata


@pytest.fixture(scope="module")
def det(baseline_model):
    return load_model(baseline_model)


@pytest.fixture
def incoming(mvtec_dir, tmp_path) -> Path:
    root = tmp_path / "incoming"
    root.mkdir()
    for d in ("good", "blob", "crack"):
        shutil.copy(mvtec_dir / "test" / d / "000.png", root / f"{d}_000.png")
    return root


def _rows(out: Path) -> list[dict]:
    with open(out / CSV_NAME, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def test_p01_second_sort_on_same_out_is_refused(baseline_model, incoming, tmp_path, capsys):
    out = tmp_path / "sorted"
    with folder_lock(out, "insightad sort"):  # a first run holding the folder
        rc = main(["sort", "--model", str(baseline_model), "--input", str(incoming), "--out", str(out)])
    assert rc != 0
    err = capsys.readouterr().err
    assert "already writing to this folder" in err and "Traceback" not in err
    assert not (out / CSV_NAME).exists()  # the refused run wrote nothing
    assert main(["sort", "--model", str(baseline_model), "--input", str(incoming), "--out", str(out)]) == 0
    assert len(_rows(out)) == 3


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 names are a POSIX byte-name matter")
def test_p03_non_utf8_name_round_trips_and_resumes(det, incoming, tmp_path):
    raw = os.fsencode(str(incoming)) + b"/caf\xe9_\xff.png"
    shutil.copy(incoming / "good_000.png", os.fsdecode(raw))
    out = tmp_path / "sorted"
    s = FolderSorter(det, incoming, out, move=True).run()
    assert s.processed == 4 and s.errors == 0
    csv_bytes = (out / CSV_NAME).read_bytes()
    assert b"caf\xe9_\xff.png" in csv_bytes  # the name's own bytes, not a mangled or escaped form
    names = {os.fsencode(p.name) for p in out.rglob("*.png")}
    assert b"caf\xe9_\xff.png" in names
    again = FolderSorter(det, incoming, out, move=True).run()  # a resume reads the CSV and journal back
    assert again.skipped == 0 and again.processed == 0  # all moved out: nothing left to skip or sort


def test_p06_symlinked_normal_folder_is_refused(det, incoming, tmp_path):
    out, elsewhere = tmp_path / "sorted", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "normal").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InsightADError, match="outside the output folder"):
        FolderSorter(det, incoming, out).run()
    assert list(elsewhere.iterdir()) == []


def test_p06_symlinked_subfolder_is_refused(det, incoming, tmp_path):
    (incoming / "line2").mkdir()
    shutil.copy(incoming / "good_000.png", incoming / "line2" / "a.png")
    out, elsewhere = tmp_path / "sorted", tmp_path / "elsewhere"
    for d in ("normal", "anomalous"):
        (out / d).mkdir(parents=True)
        (out / d / "line2").symlink_to(elsewhere, target_is_directory=True)
    elsewhere.mkdir()
    with pytest.raises(InsightADError, match="outside the output folder"):
        FolderSorter(det, incoming, out).run()
    assert list(elsewhere.iterdir()) == []


def test_p10_fifo_in_sort_input_is_skipped(det, incoming, tmp_path):
    os.mkfifo(incoming / "pipe.png")
    s = FolderSorter(det, incoming, tmp_path / "sorted").run()  # would block forever reading the FIFO
    assert s.processed == 3


def test_p10_fifo_named_to_predict_is_refused(baseline_model, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "insightad", "predict", "--model", str(baseline_model), str(fifo)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "not a regular file" in r.stderr and str(fifo) in r.stderr and "Traceback" not in r.stderr


def test_p11_file_deleted_during_sort_is_an_error_row(det, incoming, tmp_path):
    victim = incoming / "crack_000.png"

    def hook(stage: str, what: str) -> None:
        if stage == "intents":
            victim.unlink()  # scored, journalled, then gone before the copy

    out = tmp_path / "sorted"
    s = FolderSorter(det, incoming, out, hook=hook).run()
    assert s.errors == 1 and s.processed == 3
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert rows["crack_000.png"]["decision"] == "error" and "disappeared" in rows["crack_000.png"]["error"]
    assert not list(out.rglob("crack_000.png"))
    again = FolderSorter(det, incoming, out).run()
    assert again.processed == 0 and again.recovered == 0


def test_p02_calibrate_unwritable_out_leaves_model_unchanged(baseline_model, mvtec_dir, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    before = model.read_bytes()
    (tmp_path / "afile").write_text("a file, not a folder")
    for bad in ("/proc/x.json", str(tmp_path / "afile" / "x.json")):
        rc = main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--out", bad])
        assert rc != 0
        err = capsys.readouterr().err
        assert "--out" in err and "Traceback" not in err
        assert model.read_bytes() == before
    assert read_metadata(model)["threshold"] is not None
