"""Hardening p50: two processes sharing outputs, a run interrupted or out of room.

Covered: two ``insightad batch`` runs given one --csv (each replaced the other's CSV: now the second is refused);
``*.lock`` files left behind by every batch and sort run; a lock file removed by its finishing holder while a
second run had it open; a full disk while writing; folders removed while a run writes them; two trains, or a
calibrate and a train, writing one model file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
from pathlib import Path

import pytest

from insightad.cli import main
from insightad.data.synthetic import write_dataset
from insightad.errors import InsightADError
from insightad.io import LOCK_NAME, file_lock
from tests.conftest import good_test_images


@pytest.fixture
def images(mvtec_dir, tmp_path) -> Path:
    return good_test_images(mvtec_dir, tmp_path / "in", 4)


def _locks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".lock"))


# ----------------------------------------------------------------------------- locks
def test_p50_batch_and_sort_leave_no_lock_file(baseline_model, images, tmp_path, capsys):
    """A finished batch left ``r.parquet.lock`` beside its table, and sort ``.insightad.lock`` in its folder."""
    out = tmp_path / "out"
    assert main(["batch", "--model", str(baseline_model), "--input", str(images), "--out", str(out / "r.parquet"),
                 "--csv", str(out / "r.csv")]) == 0
    assert main(["sort", "--model", str(baseline_model), "--input", str(images), "--out", str(out / "sorted")]) == 0
    capsys.readouterr()
    assert _locks(out) == []
    assert (out / "r.parquet").is_file() and (out / "r.csv").is_file()


def test_p50_two_batch_runs_given_one_csv(baseline_model, images, tmp_path, capsys, monkeypatch):
    """Two tables, one --csv: the runs were not locked against each other, and the CSV ended up holding the rows
    of whichever finished last (here run B's, over run A's). Run B is now refused at once, naming --csv and the
    holder, and the CSV holds run A's rows."""
    from insightad.apps.batch import BatchJob, ResultsStore, list_source, run_local
    from insightad.apps.batch_store import ResultsStore as Store
    from insightad.inference.load import load_for_inference

    shared = tmp_path / "shared.csv"
    committed, go_on = threading.Event(), threading.Event()
    commit = Store.commit

    def paused_commit(self, table):  # run A stops after its first chunk until run B has had its go
        path = commit(self, table)
        committed.set()
        assert go_on.wait(60)
        return path

    monkeypatch.setattr(Store, "commit", paused_commit)
    det = load_for_inference(baseline_model, "torch")
    job = BatchJob(Path(baseline_model), list_source(str(images)), ResultsStore(tmp_path / "a.parquet", shared))
    a = threading.Thread(target=run_local, args=(job, det))
    a.start()
    try:
        assert committed.wait(60)
        monkeypatch.setattr(Store, "commit", commit)
        rc = main(["batch", "--model", str(baseline_model), "--input", str(images),
                   "--out", str(tmp_path / "b.parquet"), "--csv", str(shared), "--engine", "torch"])
    finally:
        go_on.set()
        a.join(60)
    err = capsys.readouterr().err
    assert rc == 1 and "another run is writing this --csv" in err and str(os.getpid()) in err, err
    assert "choose another --csv" in err and "Traceback" not in err
    assert not (tmp_path / "b.parquet").exists()
    assert len(shared.read_text().splitlines()) == 5  # the header and run A's 4 rows
    assert _locks(tmp_path) == []


def test_p50_lock_file_removed_by_its_finishing_holder(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder finished (and removed it) must not hold a lock on
    the removed file while a third run locks the new one: it locks the file the name holds."""
    lock = tmp_path / LOCK_NAME
    real_flock = fcntl.flock
    calls = []

    def finishing_holder(fd: int, op: int) -> None:
        if not calls:  # the holder finishes between our open and our lock: its file goes, a new run makes one
            os.unlink(lock)
            lock.write_text("")
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", finishing_holder)
    with file_lock(lock, "out"):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert len(calls) == 2  # the removed file's lock was given up, the current file's taken
        with pytest.raises(InsightADError, match="another run is writing it"):
            with file_lock(lock, "out"):
                pass
    assert not lock.exists()


def test_p50_evaluate_report_is_locked_and_clears_killed_stages(baseline_model, tmp_path, capsys):
    """Two evaluate runs on one --report moved their files in at once (a report made of both); a run killed
    while making its report left its hidden staging folder (every figure) in --report for good."""
    from insightad.io import folder_lock

    report = tmp_path / "report"
    killed = report / ".report-k1ll3d"
    killed.mkdir(parents=True)
    (killed / "roc_curve.png").write_bytes(b"half")
    data = write_dataset(tmp_path / "small", kind="disc", layout="mvtec", n_train=1, n_test_good=2, n_per_defect=1,
                         defects=("scratch",), size=64, seed=5)
    args = ["evaluate", "--model", str(baseline_model), "--data", str(data), "--report", str(report),
            "--engine", "torch"]
    with folder_lock(report, "insightad evaluate"):  # another evaluate is writing this report
        assert main(args) == 1
    err = capsys.readouterr().err
    assert "another insightad evaluate is already writing to this folder" in err and "choose another --report" in err
    assert not (report / "metrics.json").exists()
    assert main(args) == 0
    capsys.readouterr()
    assert sorted(p.name for p in report.iterdir() if p.name.startswith(".")) == []
    assert (report / "metrics.json").is_file()


@pytest.fixture(scope="module")
def exported(baseline_model, tmp_path_factory) -> Path:
    """``m.onnx`` exported into a folder where an export killed mid-way left its temporary and its twin."""
    from insightad.engines.export import twin_folder
    from insightad.io import TMP_SUFFIX

    folder = tmp_path_factory.mktemp("exported")
    killed = folder / f".m.onnx.k1ll3d{TMP_SUFFIX}"  # what atomic_write names the graph while it is written
    twin = twin_folder(killed)
    twin.mkdir()
    (twin / "graph.onnx").write_bytes(b"constants")
    killed.write_bytes(b"half a graph")
    hours_ago = os.stat(twin).st_mtime - 7200
    for p in (twin / "graph.onnx", twin, killed):
        os.utime(p, (hours_ago, hours_ago))
    assert main(["export", "--model", str(baseline_model), "--out", str(folder / "m.onnx")]) == 0
    return folder / "m.onnx"


def test_p50_a_killed_exports_twin_is_removed(exported):
    """A graph export killed mid-way (train's .onnx beside the model, export, calibrate) left its external-data
    twin, a hidden folder with a whole copy of the graph's constants, beside --out for good: its name was no
    temporary's. The next write of that graph removes it, as it removes the killed run's temporary file."""
    assert sorted(p.name for p in exported.parent.iterdir()) == ["m.onnx"]


def test_p50_ready_copy_pruned_by_another_process(exported, tmp_path, monkeypatch):
    """Another process pruning the ONNX cache between this one finding a graph's ready copy and opening it made
    the prediction fail (ONNX Runtime: no such file); the graph is now opened the slow way instead."""
    import insightad.engines.onnx_runtime as ort_mod
    from insightad.engines.cache import ready_copy

    monkeypatch.setenv("INSIGHTAD_CACHE", str(tmp_path / "cache"))
    pruned = []

    def found_then_pruned(graph):
        copy = ready_copy(graph)
        shutil.rmtree(copy.parent)  # the other process's prune_cache
        pruned.append(copy)
        return copy

    monkeypatch.setattr(ort_mod, "ready_copy", found_then_pruned)
    engine = ort_mod.OnnxEngine(str(exported))
    assert pruned and not pruned[0].exists()
    assert engine.input_name == "images"


# ----------------------------------------------------------------------------- a full disk
def _disk_full_after(monkeypatch, calls: int) -> None:
    """Every ``os.fsync`` after the first ``calls`` fails as on a full disk (what a write that finds no room
    raises, at the latest when the data is made durable)."""
    real = os.fsync
    done = []

    def fsync(fd: int) -> None:
        if len(done) >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if "tmp" in p.name or p.name.startswith(".report-"))


def test_p50_full_disk_is_one_line_naming_the_output(baseline_model, images, tmp_path, capsys, monkeypatch):
    """A full disk while predict wrote an overlay (or any command its output) was a Python traceback (OSError
    from deep inside the write); now one line naming the file the user asked for, nothing half-written left."""
    _disk_full_after(monkeypatch, 0)
    rc = main(["predict", "--model", str(baseline_model), str(images / "0.png"), "--overlay", str(tmp_path / "o"),
               "--engine", "torch"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "No space left on device" in err
    assert f"{tmp_path / 'o' / '0_overlay.png'}: could not be written" in err, err
    assert _temporaries(tmp_path) == []


def test_p50_sort_on_a_full_disk_resumes_whole(baseline_model, images, tmp_path, capsys, monkeypatch):
    """sort stopped by a full disk part-way: one line naming the file; run again with room, every image is
    sorted exactly once and no temporary is left."""
    out = tmp_path / "sorted"
    _disk_full_after(monkeypatch, 3)
    rc = main(["sort", "--model", str(baseline_model), "--input", str(images), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "could not be written (No space left on device)" in err, err
    monkeypatch.undo()
    assert main(["sort", "--model", str(baseline_model), "--input", str(images), "--out", str(out)]) == 0
    capsys.readouterr()
    copied = sorted(p.name for p in out.rglob("*.png"))
    assert copied == sorted(p.name for p in images.glob("*.png"))
    assert _temporaries(out) == [] and _locks(out) == []


# ----------------------------------------------------------------------------- a folder removed under a run
def test_p50_sort_output_folder_removed_while_running(baseline_model, images, tmp_path, capsys, monkeypatch):
    """The output folder removed while sort ran: it made the folders again, appended rows to a results.csv
    without its header and ended in a traceback (KeyError: 'path'). Now it stops at once with one line, writes
    nothing more, and the next run sorts every image once."""
    from insightad.apps.sort import FolderSorter

    out = tmp_path / "sorted"
    stage = FolderSorter._stage

    def removed(self, name: str, what: str) -> None:  # someone removes the folder once the first batch is journaled
        if name == "intents" and out.exists():
            shutil.rmtree(out)
        stage(self, name, what)

    monkeypatch.setattr(FolderSorter, "_stage", removed)
    args = ["sort", "--model", str(baseline_model), "--input", str(images), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is gone (the output folder was removed or replaced while sort was running)" in err, err
    assert "Traceback" not in err and not out.exists()
    monkeypatch.undo()
    assert main(args) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.rglob("*.png")) == sorted(p.name for p in images.glob("*.png"))


def test_p50_batch_parts_removed_while_running(baseline_model, images, tmp_path, capsys, monkeypatch):
    """The committed parts of a running batch removed (the folder cleaned while it ran): the job said '4 inputs:
    4 normal' with 2 rows in --out and exit code 0. Now it fails naming the missing rows; run again, all 4 are
    there."""
    from insightad.apps.batch_store import ResultsStore

    out = tmp_path / "r.parquet"
    commit = ResultsStore.commit

    def removed_after_first(self, table):
        path = commit(self, table)
        if not getattr(removed_after_first, "done", False):
            removed_after_first.done = True
            shutil.rmtree(self.parts_dir)
        return path

    monkeypatch.setattr(ResultsStore, "commit", removed_after_first)
    args = ["batch", "--model", str(baseline_model), "--input", str(images), "--out", str(out), "--chunk", "2",
            "--engine", "torch"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "2 of 4 inputs have no row" in err and "run the same command again" in err, err
    monkeypatch.undo()
    assert main(args) == 0
    capsys.readouterr()
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 4


def test_p50_two_trains_on_one_model_file(mvtec_dir, tmp_path, capsys):
    """Two training runs given one --out each wrote the model and then its graph beside it: the model of one
    could end beside the graph (and checkpoint, report) of the other, and one run's hours were silently
    replaced. The second run is now refused before it trains, naming the first."""
    out = tmp_path / "m.safetensors"
    with file_lock(tmp_path / "m.safetensors.lock", str(out)):  # the first run, under way
        rc = main(["train", "--data", str(mvtec_dir), "--method", "baseline", "--image-size", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "another run is writing it" in err and str(os.getpid()) in err, err
    assert not out.exists() and not (tmp_path / "m.onnx").exists()


def test_p50_calibrate_while_another_run_writes_the_model(baseline_model, mvtec_dir, tmp_path, capsys):
    """calibrate reads the model file and later rewrites it (and its graph): a train or calibrate writing that
    file meanwhile was lost, or left its graph beside the other's model. Refused at once now, file untouched."""
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    before = model.read_bytes()
    with file_lock(tmp_path / "m.safetensors.lock", str(model)):  # a train or calibrate writing m.safetensors
        rc = main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--engine", "torch"])
    err = capsys.readouterr().err
    line = f"{model}: another run is writing it (lock {model}.lock held by pid {os.getpid()}); wait for it to finish"
    assert rc == 1 and line in err and "choose another --model" in err and len(err.strip().splitlines()) == 1, err
    assert model.read_bytes() == before
    with file_lock(tmp_path / "m.safetensors.lock", str(model)):  # --dry-run writes nothing: it takes no lock
        assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--engine", "torch",
                     "--dry-run"]) == 0
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--engine", "torch"]) == 0
    capsys.readouterr()
    assert model.read_bytes() != before and _locks(tmp_path) == []  # written, and its lock file removed


def test_p50_two_augments_on_one_folder(images, tmp_path, capsys):
    """Two augment runs given one --out (other seeds or transformations) wrote the same names: the folder became
    a mix of both runs while each said it wrote every file. The second is refused before it writes anything."""
    out = tmp_path / "aug"
    args = ["augment", "--input", str(images), "--out", str(out), "--copies", "2"]
    with file_lock(out / LOCK_NAME, str(out)):  # the first run, under way
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "another insightad augment is already writing to this folder" in err and str(os.getpid()) in err, err
        assert "choose another --out" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert main(args) == 0
    capsys.readouterr()
    assert len(list(out.glob("*.png"))) == 8 and _locks(out) == []


def test_p50_two_predicts_on_one_overlay_folder(mvtec_dir, images, tmp_path, capsys):
    """Two predict runs (other models, other images of one name) given one --overlay or --heatmap folder wrote
    the same ``<stem>_overlay.png``: one run's table named pictures the other had drawn. The second run is now
    refused before it writes, naming the folder and its flag; a folder given to both flags is locked once."""
    model = tmp_path / "padim.safetensors"
    assert main(["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--no-onnx",
                 "--out", str(model)]) == 0
    ov, hm = tmp_path / "ov", tmp_path / "hm"
    capsys.readouterr()
    with file_lock(hm / LOCK_NAME, str(hm)):  # a run writing heatmaps there, under way
        assert main(["predict", "--model", str(model), str(images), "--overlay", str(ov), "--heatmap", str(hm)]) == 1
        err = capsys.readouterr().err
        assert f"{hm}: another run is already writing to this folder" in err and str(os.getpid()) in err, err
        assert "choose another --heatmap" in err and len(err.strip().splitlines()) == 1, err
        assert not ov.exists() and sorted(p.name for p in hm.iterdir()) == [LOCK_NAME]  # --overlay released
    both = tmp_path / "both"
    assert main(["predict", "--model", str(model), str(images), "--overlay", str(both), "--heatmap", str(both)]) == 0
    capsys.readouterr()
    assert len(list(both.glob("*_overlay.png"))) == 4 and len(list(both.glob("*_heatmap.png"))) == 4
    assert _locks(tmp_path) == []


def test_p50_export_while_the_model_file_is_rewritten(baseline_model, tmp_path, capsys, monkeypatch):
    """export hashed the model file after reading it: a calibrate or train replacing the file in between had the
    old model's graph stamped with the new model's sha256, and predict, finding it beside the model, scored with
    the old threshold. A file that changed while export read it is now refused, and nothing is written."""
    import insightad.model_file as model_file

    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    load = model_file.load_model

    def load_then_rewritten(path, *a, **k):
        det = load(path, *a, **k)
        model.write_bytes(model.read_bytes() + b" ")  # another run's model file, in place now
        return det

    monkeypatch.setattr(model_file, "load_model", load_then_rewritten)
    assert main(["export", "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert f"{model}: changed while export read it" in err and "run export again" in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_p50_two_trains_on_one_report_folder(mvtec_dir, tmp_path, capsys):
    """Two trains writing other model files but one --report folder left a report made of both (one run's
    decision.json beside the other's report.md). The second is now refused before it trains."""
    report = tmp_path / "report"
    with file_lock(report / LOCK_NAME, str(report)):  # a run writing that report, under way
        rc = main(["train", "--data", str(mvtec_dir), "--method", "baseline", "--image-size", "64", "--no-onnx",
                   "--out", str(tmp_path / "b.safetensors"), "--report", str(report)])
        err = capsys.readouterr().err
        assert rc == 1 and f"{report}: another run is already writing to this folder" in err, err
        assert "choose another --report" in err and str(os.getpid()) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.safetensors").exists() and _locks(tmp_path) == []


def test_p50_export_beside_the_model_while_a_train_writes_it(baseline_model, tmp_path, capsys):
    """The graph beside a model file is also what train and calibrate write there: an export of the old model
    finishing after a calibrate put its graph over the new one. Exporting there now takes the model file's lock
    (refused while another run holds it); a graph elsewhere does not need it."""
    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    with file_lock(tmp_path / "m.safetensors.lock", str(model)):  # a calibrate of m.safetensors, under way
        assert main(["export", "--model", str(model)]) == 1
        err = capsys.readouterr().err
        assert f"{model}: another run is writing it" in err and "choose another --out" in err, err
        assert not (tmp_path / "m.onnx").exists()
        assert main(["export", "--model", str(model), "--out", str(tmp_path / "elsewhere.onnx")]) == 0
    assert main(["export", "--model", str(model)]) == 0
    capsys.readouterr()
    assert (tmp_path / "m.onnx").is_file() and _locks(tmp_path) == []
