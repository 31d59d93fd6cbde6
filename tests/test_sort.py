"""insightad sort: decisions into folders, CSV, unreadable images, batches, refusals, and interrupted runs
(an exception at each stage, and a real kill -9) that must neither lose nor duplicate a file."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from insightad.apps.sort import CSV_NAME, JOURNAL, FolderSorter
from insightad.cli import main
from insightad.errors import InsightADError
from insightad.model_file import load_model


@pytest.fixture(scope="module")
def det(baseline_model):
    return load_model(baseline_model)


@pytest.fixture
def incoming(mvtec_dir, tmp_path) -> Path:
    """7 images (3 good, 4 defective) in two folders, one unreadable .png and a text file."""
    root = tmp_path / "incoming"
    (root / "line2").mkdir(parents=True)
    for d in ("good", "blob", "crack"):
        shutil.copy(mvtec_dir / "test" / d / "000.png", root / f"{d}_000.png")
    for d in ("good", "scratch", "missing", "good"):
        n = "002" if d == "good" and (root / "line2" / "good_001.png").exists() else "001"
        shutil.copy(mvtec_dir / "test" / d / f"{n}.png", root / "line2" / f"{d}_{n}.png")
    (root / "line2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def _images(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def _rows(out: Path) -> list[dict]:
    with open(out / CSV_NAME, newline="") as f:
        return list(csv.DictReader(f))


def _check_complete(src: Path, out: Path, names: list[str], moved: bool) -> list[dict]:
    """Every readable image exactly once in normal/ or anomalous/, one current CSV row per image (the last of
    its path: an unreadable image is tried again on each run, after its earlier error rows), no temp files."""
    every = _rows(out)
    last = {r["path"]: r for r in every}
    assert all(r["decision"] == "error" for r in every if r is not last[r["path"]])
    rows = [r for r in every if r is last[r["path"]]]
    assert sorted(Path(r["path"]).relative_to(src).as_posix() for r in rows) == names  # one row each
    for r in rows:
        rel = Path(r["path"]).relative_to(src).as_posix()
        if r["decision"] == "error":
            assert (src / rel).exists() and r["error"] and not r["destination"]
            continue
        assert r["destination"] == f"{r['decision']}/{rel}"
        assert (out / r["destination"]).is_file()
        other = "normal" if r["decision"] == "anomalous" else "anomalous"
        assert not (out / other / rel).exists()
        assert (src / rel).exists() != moved
    placed = _images(out / "normal") + _images(out / "anomalous")
    assert len(placed) == sum(r["decision"] != "error" for r in rows)
    assert not list(out.rglob("*.partial"))
    return rows


def test_sort_copies_with_csv_and_errors(det, incoming, tmp_path, capsys, baseline_model):
    names = _images(incoming)
    out = tmp_path / "out"
    assert main(["sort", "--model", str(baseline_model), "--sort_out", str(incoming), "--out", str(out),
                 "--batch-size", "3"]) == 1  # one unreadable image: exit 1, after sorting the others
    text = capsys.readouterr()
    assert "sorted 8 images" in text.out and "1 unreadable" in text.out and "broken.png" in text.err
    rows = _check_complete(incoming, out, names, moved=False)
    pred = det.predict([r["path"] for r in rows if r["decision"] != "error"], maps=False)
    decided = [r for r in rows if r["decision"] != "error"]
    assert [r["decision"] == "anomalous" for r in decided] == list(pred.labels)
    assert np.allclose([float(r["score"]) for r in decided], pred.scores, rtol=1e-4)
    assert all((float(r["score_normalized"]) > 0.5) == (r["decision"] == "anomalous") for r in decided)
    # started again: nothing to do, nothing duplicated
    assert main(["sort", "--model", str(baseline_model), "--input", str(incoming), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "skipped 7 images" in text and "tried again 1 images" in text
    by_path = (lambda r: r["path"])  # the retried error row is now the last one
    assert sorted(_check_complete(incoming, out, names, moved=False), key=by_path) == sorted(rows, key=by_path)


def test_sort_moves_in_batches(det, incoming, tmp_path, monkeypatch):
    names = _images(incoming)
    sizes = []
    real = det.predict
    monkeypatch.setattr(det, "predict", lambda paths, **kw: sizes.append(len(paths)) or real(paths, **kw))
    s = FolderSorter(det, incoming, tmp_path / "out", move=True, batch_size=3).run()
    assert max(sizes) == 3 and sum(sizes) == 8
    assert (s.normal + s.anomalous, s.errors) == (7, 1)
    _check_complete(incoming, tmp_path / "out", names, moved=True)
    assert _images(incoming) == ["line2/broken.png"]  # the unreadable image is left in place


@pytest.mark.parametrize("stage,after", [("intents", 2), ("transferred", 4), ("transferred", 7)])
@pytest.mark.parametrize("move", [False, True])
def test_interrupted_run_resumes_without_loss_or_duplicates(det, incoming, tmp_path, stage, after, move):
    names = _images(incoming)
    out = tmp_path / "out"
    seen = []

    def crash(s, what):
        if s == stage:
            seen.append(what)
            if len(seen) == after:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FolderSorter(det, incoming, out, move=move, batch_size=3, hook=crash).run()
    s = FolderSorter(det, incoming, out, move=move, batch_size=3).run()
    rows = _check_complete(incoming, out, names, moved=move)
    # copy: every image is skipped or handled now; move: the sorted ones are gone from the input folder
    assert s.skipped + s.processed == len(rows) if not move else s.skipped == 0
    assert s.recovered > 0 or stage == "intents"


def test_kill_9_in_the_middle(baseline_model, incoming, tmp_path, det):
    names = _images(incoming)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from insightad.apps.sort import FolderSorter
        from insightad.model_file import load_model
        n = []
        def hook(stage, what):
            if stage == "transferred":
                n.append(what)
                if len(n) == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
        FolderSorter(load_model({str(baseline_model)!r}), {str(incoming)!r}, {str(out)!r}, move=True,
                     batch_size=4, hook=hook).run()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(_rows(out)) == 4  # the first batch is recorded, the second was cut short
    with open(out / CSV_NAME, "a") as f:
        f.write("/torn/row.png,0.1")  # and a half-written row, as a kill during a write leaves
    with open(out / JOURNAL, "a") as f:
        f.write('{"kind": "intent", "path": "/torn')
    (out / "normal").mkdir(exist_ok=True)
    (out / "normal" / ".half_copied.png.partial").write_bytes(b"\x89PNG")  # a copy cut short
    s = FolderSorter(det, incoming, out, move=True, batch_size=4).run()
    # batch 1: 3 moved + 1 error (tried again); batch 2: 4 intents
    assert s.recovered == 4 and s.skipped == 0 and s.retried == 1
    _check_complete(incoming, out, names, moved=True)


def test_refusals(det, incoming, tmp_path, baseline_model, capsys):
    with pytest.raises(InsightADError, match="--out must not be inside the input folder"):
        FolderSorter(det, incoming, incoming / "sorted")
    with pytest.raises(InsightADError, match="the input folder is inside the output folder"):
        FolderSorter(det, incoming / "line2", incoming)
    with pytest.raises(InsightADError, match="no such folder"):
        FolderSorter(det, tmp_path / "missing", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InsightADError, match="no images found"):
        FolderSorter(det, empty, tmp_path / "o2").run()
    out = tmp_path / "out"
    FolderSorter(det, incoming, out, batch_size=4).run()
    with pytest.raises(InsightADError, match="made at threshold .* pass --threshold"):
        FolderSorter(det, incoming, out, threshold=det.threshold_ * 2).run()
    with pytest.raises(InsightADError, match="in copy mode; run again without --move"):
        FolderSorter(det, incoming, out, move=True).run()
    with pytest.raises(InsightADError, match="of another folder"):
        FolderSorter(det, incoming / "line2", out).run()
    assert main(["sort", "--model", str(baseline_model), "--input", str(incoming), "--out",
                 str(incoming / "x")]) == 1
    assert "inside the input folder" in capsys.readouterr().err
    assert not (incoming / "x").exists()


def test_threshold_override_and_default_out(baseline_model, incoming, tmp_path, capsys):
    assert main(["sort", "--model", str(baseline_model), "--input", str(incoming), "--threshold", "1e9",
                 "--json"]) == 1
    out = incoming.with_name("incoming_sorted")
    rows = _rows(out)
    assert {r["decision"] for r in rows} == {"normal", "error"}
