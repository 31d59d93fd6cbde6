"""Sort a folder of images into ``normal/`` and ``anomalous/`` with a CSV of scores, safe to interrupt.

Images are read in batches (nothing is held for the whole folder); an unreadable image becomes an
``error`` row and the run goes on. Crash safety rests on two append-only files in the output folder:

- ``.insightad-sort.journal``: one JSON line per decided image (*intent*: source, destination,
  score, decision), written and fsync'ed **before** any file is copied or moved;
- ``results.csv``: one row per finished image, appended and fsync'ed **after** its file is in place.

A copy is written to a hidden temporary name, fsync'ed, then renamed, so a destination name only
ever holds a complete file; a move is a rename (or copy + rename + delete of the source across
file systems). On restart, a torn last line of either file is cut off, every intent without a CSV
row is finished (the destination is there: done; the source is there: transfer again; both, after a
cross-file-system move: the source is deleted once the sizes match), then the walk goes on. So no
image is lost, none ends up twice, and no row is written twice.

Resume goes by identity, not by name: intents and rows record the source's size and mtime_ns (taken
before it is scored), and an image is skipped only when the last row of its path is a decision made
for a file of that identity. A new file that took a sorted file's name is sorted, and an image whose
last row is an error is tried again (its new row follows the old one: the last row of a path is
current). Journals and CSVs of older versions, without the identity, are still read (by name).

In copy mode a changed image's earlier copy is removed once its new copy is in place (the intent names it
under ``replaces``, so recovery finishes that too): the output folders hold only current copies. When a run
completes, the journal is cut back to its header and ``results.csv`` is rewritten (temporary name, rename) with
only the newest row of each path; until then both are only appended to.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insightad.data.images import no_images_message
from insightad.errors import InsightADError
from insightad.io import (
    TMP_SUFFIX,
    atomic_write_bytes,
    csv_text,
    csv_value,
    durable_copy,
    file_identity,
    folder_lock,
    fsync_dir,
    fsync_file,
    iter_images,
)
from insightad.outputs import check_output_dir

JOURNAL = ".insightad-sort.journal"
CSV_NAME = "results.csv"
# anomalous: true/false (empty for an error), the name every machine-readable output uses; decision: the folder
# size, mtime_ns: the source's identity when it was scored (what a resume compares; empty if unknown)
FIELDS = ("path", "score", "score_normalized", "anomalous", "decision", "destination", "error", "size", "mtime_ns")
DECISIONS = ("normal", "anomalous")
REQUIRED_COLUMNS = ("path", "decision", "destination")  # what a resume reads from results.csv
INTENT_KEYS = {"path", "dest", "decision", "score"}  # what recovery reads from an intent
# File names are bytes on POSIX: a name that is not valid UTF-8 reaches Python as lone surrogates, and
# ``surrogateescape`` writes those back as the original bytes, so the CSV and the journal round-trip it.
ENCODING, NAME_ERRORS = "utf-8", "surrogateescape"

Hook = Callable[[str, str], None]  # (stage, relative path): test hook for simulated crashes
# paths to score -> (paths of a chunk, its Prediction) as chunks finish, in any order (e.g. apps.batch_ray)
Scorer = Callable[[list[Path]], Iterator[tuple[list[Path], Any]]]
Identity = tuple[int, int]  # (size, mtime_ns), as io.file_identity gives it


def _identity_of(record: dict[str, Any]) -> Identity | None:
    """The identity a journal intent or CSV row recorded; None for one written by an older version."""
    try:
        return int(record["size"]), int(record["mtime_ns"])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class SortSummary:
    """What one run did. ``skipped``: images an earlier run sorted, unchanged since; ``retried``: images
    whose earlier outcome was an error; ``changed``: images that replaced a sorted file of the same name;
    ``replaced``: earlier copies of changed images removed (copy mode)."""

    out: Path
    csv: Path
    move: bool
    normal: int = 0
    anomalous: int = 0
    errors: int = 0
    skipped: int = 0
    retried: int = 0
    changed: int = 0
    replaced: int = 0
    recovered: int = 0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)  # files of the input folder passed over by their names

    @property
    def processed(self) -> int:
        return self.normal + self.anomalous + self.errors

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "csv": str(self.csv), "mode": "move" if self.move else "copy",
                "normal": self.normal, "anomalous": self.anomalous, "errors": self.errors, "skipped": self.skipped,
                "retried": self.retried, "changed": self.changed, "replaced": self.replaced,
                "recovered": self.recovered, "seconds": round(self.seconds, 3)}


# ----------------------------------------------------------------------------- file helpers
def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short by a kill)."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            fsync_file(f)


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The rows of ``results.csv`` (cells as written, the formula guard of ``io.csv_cell`` taken off) and its
    columns; a byte-order mark (the file saved again by a spreadsheet) is no part of the first column's name."""
    with open(path, newline="", encoding="utf-8-sig", errors=NAME_ERRORS) as f:
        reader = csv.DictReader(f)
        rows = [{k: csv_value(v) if isinstance(v, str) else v for k, v in r.items()} for r in reader]
        return rows, tuple(reader.fieldnames or FIELDS)


def _first_line(path: Path, what: str) -> bytes | None:
    """The first line of an output file this sort reads back (None when there is none), or one line refusing a
    folder, pipe or device that took its name."""
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        raise InsightADError(f"{path}: expected {what}, got a folder or a special file; move it away or use a new --out")
    with open(path, "rb") as f:
        return f.readline()


def _check_csv_columns(path: Path) -> None:
    """Refuse a ``results.csv`` that is not one sort wrote (a file of the user's, another tool's CSV) before
    anything in it is cut short or appended to; one whose header a kill cut short is sort's."""
    first = _first_line(path, "sort's CSV of results")
    text = (first or b"").decode(ENCODING, NAME_ERRORS).removeprefix("\ufeff").rstrip("\r\n")
    if not text or (",".join(FIELDS).startswith(text) and not (first or b"").endswith(b"\n")):
        return
    missing = [c for c in REQUIRED_COLUMNS if c not in next(csv.reader([text]))]
    if missing:
        raise InsightADError(f"{path}: not a results file of insightad sort (no {', '.join(missing)} "
                             f"column{'s' if len(missing) > 1 else ''}); "
                             "move it away or use a new --out")


def _journal_header(path: Path) -> dict[str, Any] | None:
    """The header of this folder's journal; None when there is none yet (or a kill cut it short: it is written
    again). A file of that name that is not sort's journal is refused before anything is cut or appended."""
    first = _first_line(path, "sort's journal")
    if not first or not first.endswith(b"\n"):
        return None
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise InsightADError(f"{path}: not a journal of insightad sort (line 1 is no header); move it away or "
                             "use a new --out")
    return header


def _read_intents(path: Path) -> list[dict[str, Any]]:
    """The intents of the journal (after its header); a line that is not one is refused, naming the line."""
    intents = []
    for n, line in enumerate(path.read_text(encoding=ENCODING, errors=NAME_ERRORS).splitlines()[1:], start=2):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
        except ValueError:
            it = None
        if not isinstance(it, dict) or not INTENT_KEYS <= it.keys():
            raise InsightADError(f"{path}: line {n} is not an intent of insightad sort (damaged?); move the folder "
                                 "away or use a new --out")
        intents.append(it)
    return intents


def _gone(path: Path) -> InsightADError:
    """The error for the journal or CSV of a running sort gone: its output folder was removed or replaced."""
    return InsightADError(f"{path.parent}: its {path.name} is gone (the output folder was removed or replaced while "
                          "sort was running); run the command again to sort the images anew")


def _transfer(src: Path, dest: Path, move: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if move and os.stat(src).st_dev == os.stat(dest.parent).st_dev:
        os.rename(src, dest)  # atomic: the file is at one of the two names, never both or neither
        return
    durable_copy(src, dest)
    if move:
        os.unlink(src)


def check_folders(input_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """Resolved (input, out); refuses an output folder inside the input folder (or the reverse)."""
    if not input_dir.exists():
        raise InsightADError(f"{input_dir}: no such folder")
    if not input_dir.is_dir():
        raise InsightADError(f"{input_dir}: expected a folder of images to sort, got a file")
    check_output_dir(out_dir, "--out", inputs=[input_dir])  # a sorted copy inside would be sorted again
    src, out = input_dir.resolve(), out_dir.resolve()
    if out in src.parents:
        raise InsightADError(f"{input_dir}: the input folder is inside the output folder {out_dir}; choose --out "
                             "elsewhere")
    return src, out


# ----------------------------------------------------------------------------- the run
class FolderSorter:
    """One sort of ``input_dir`` into ``out_dir`` with a detector; ``run()`` does (or resumes) the work."""

    def __init__(self, det, input_dir: str | Path, out_dir: str | Path, *, move: bool = False,
                 threshold: float | None = None, batch_size: int = 32, progress: bool = False,
                 hook: Hook | None = None, scorer: Scorer | None = None) -> None:
        self.det = det
        self.scorer = scorer
        self.src, self.out = check_folders(Path(input_dir), Path(out_dir))
        self.move, self.batch_size, self.progress, self.hook = move, max(1, batch_size), progress, hook
        self.threshold = float(det.threshold_ if threshold is None else threshold)
        self.journal_path, self.csv_path = self.out / JOURNAL, self.out / CSV_NAME
        self.summary = SortSummary(self.out, self.csv_path, move)
        self._claimed: set[Path] = set()
        self._ids: dict[Path, Identity | None] = {}  # identity of each image to sort, taken before scoring
        self._recovered: set[str] = set()  # paths whose intent this run finished (counted as recovered)
        self._replaces: dict[Path, str] = {}  # copy mode: a changed image's earlier copy (relative to out)

    # ------------------------------------------------------------------ journal and CSV
    def _header(self) -> dict[str, Any]:
        return {"kind": "header", "input": str(self.src), "mode": "move" if self.move else "copy",
                "threshold": self.threshold, "model": getattr(self.det, "model_path_", None),
                "method": self.det.method}

    def _open(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Create or reopen the journal and CSV; returns (CSV rows, intents)."""
        self.out.mkdir(parents=True, exist_ok=True)
        header = _journal_header(self.journal_path)  # both checked before either is cut or written to
        _check_csv_columns(self.csv_path)
        if header is not None:
            self._check_same_run(header)
        _cut_torn_tail(self.journal_path)
        _cut_torn_tail(self.csv_path)
        intents: list[dict[str, Any]] = []
        if header is not None:
            intents = _read_intents(self.journal_path)
        else:
            self._append(self.journal_path, json.dumps(self._header()) + "\n", create=True)
        done: list[dict[str, Any]] = []
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            done, self.fields = _read_rows(self.csv_path)  # a run begun by an older version keeps its columns
        else:
            self._append(self.csv_path, ",".join(FIELDS) + "\n", create=True)
        return done, intents

    def _check_same_run(self, header: dict[str, Any]) -> None:
        where = f"{self.out}: holds an unfinished or finished sort"
        if header.get("input") != str(self.src):
            raise InsightADError(f"{where} of another folder ({header.get('input')}); use a new --out")
        mode = "move" if self.move else "copy"
        if header.get("mode") != mode:
            raise InsightADError(f"{where} in {header.get('mode')} mode; run again with"
                                 f"{' --move' if header.get('mode') == 'move' else 'out --move'} or use a new --out")
        if header.get("threshold") is None:
            raise InsightADError(f"{where} whose header has no threshold; use a new --out")
        old = float(header["threshold"])
        if not np.isclose(old, self.threshold, rtol=1e-9, atol=0.0):
            raise InsightADError(f"{where} made at threshold {old:.9g}, not {self.threshold:.9g}: pass "
                                 f"--threshold {old!r} to finish it with the same decisions, or use a new --out")

    @staticmethod
    def _append(path: Path, text: str, create: bool = False) -> None:
        """Append and fsync: the line is on disk before the caller moves on. Only ``create`` makes the file: the
        journal or CSV gone in the middle of a run (its folder removed) stops the run, where appending would
        start a file without its header."""
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
        try:
            f = open(path, "a", encoding=ENCODING, errors=NAME_ERRORS, newline="",
                     opener=lambda name, _: os.open(name, flags, 0o666))
        except FileNotFoundError:
            raise _gone(path) from None
        with f:
            f.write(text)
            fsync_file(f)

    def _csv_text(self, rows: list[dict[str, Any]]) -> str:
        """Rows without the header, in this CSV's columns (every text cell guarded: ``io.csv_text``)."""
        return csv_text(getattr(self, "fields", FIELDS), rows, header=False)

    def _row(self, path: Path, score: float, normalized: float | None, decision: str, dest: str = "",
             error: str = "", ident: Identity | None = None) -> dict[str, Any]:
        fmt = (lambda v: "" if v is None or not np.isfinite(v) else f"{v:.9g}")
        anomalous = {"anomalous": "true", "normal": "false"}.get(decision, "")
        size, mtime = ident if ident is not None else ("", "")
        return {"path": str(path), "score": fmt(score), "score_normalized": fmt(normalized), "anomalous": anomalous,
                "decision": decision, "destination": dest, "error": error, "size": size, "mtime_ns": mtime}

    def _count(self, decision: str, error: str = "") -> None:
        if decision == "error":
            self.summary.errors += 1
            if len(self.summary.error_examples) < 5:
                self.summary.error_examples.append(error)
        else:
            setattr(self.summary, decision, getattr(self.summary, decision) + 1)

    # ------------------------------------------------------------------ recovery
    def _recover(self, intents: list[dict[str, Any]], done: list[dict[str, Any]]) -> None:
        """Finish every intent that has no CSV row (a run was interrupted between the two); an intent and
        a row match by path and identity (by path alone for those of older versions)."""
        for pattern in (f".*{TMP_SUFFIX}", ".*.partial"):  # ours, and those of versions before io.atomic_write
            for partial in list(self.out.rglob(pattern)):
                partial.unlink(missing_ok=True)
        rows = []
        named = {r["path"] for r in done}
        by_name = {r["path"] for r in done if _identity_of(r) is None}
        seen = {(r["path"], _identity_of(r)) for r in done}
        for it in intents:
            key = (it["path"], _identity_of(it))
            if key in seen or it["path"] in by_name or (key[1] is None and it["path"] in named):
                continue
            seen.add(key)
            named.add(it["path"])
            src, dest = Path(it["path"]), self.out / it["dest"]
            error = ""
            # a source of another identity is a new file that took the name: not this intent's (the walk sorts it)
            here = src.exists() and (key[1] is None or file_identity(src) == key[1])
            if dest.exists() and here and self.move:
                if dest.stat().st_size == src.stat().st_size:
                    os.unlink(src)
                else:
                    _transfer(src, dest, self.move)
            elif not dest.exists() and here:
                _transfer(src, dest, self.move)
            elif not dest.exists():
                error = "the image disappeared from the input folder before it was sorted"
            if not error:
                self._drop_replaced(it)
            decision = "error" if error else it["decision"]
            rows.append(self._row(src, it["score"], it.get("score_normalized"), decision,
                                  "" if error else it["dest"], error, key[1]))
            self._count(decision, error)
        done.extend(rows)
        self._recovered = {r["path"] for r in rows}
        if rows:
            self._fsync_dests()
            self._append(self.csv_path, self._csv_text(rows))
            self.summary.recovered = len(rows)

    def _drop_replaced(self, intent: dict[str, Any]) -> None:
        """Remove the earlier copy a copy-mode intent replaces, once its new copy is in place (never the new one)."""
        old = intent.get("replaces")
        if not old or old == intent["dest"] or self.move:
            return
        target = self.out / old
        if target.parts[len(self.out.parts)] not in DECISIONS or ".." in Path(old).parts:
            return  # a destination this sort did not write: left alone
        if target.is_file() and not target.is_symlink():
            target.unlink()
            fsync_dir(target.parent)
            self.summary.replaced += 1

    def _compact(self) -> None:
        """After a completed run: the journal back to its header (every intent has its row), then
        ``results.csv`` with only the newest row of each path; each replaced whole under a temporary name."""
        rows, _ = _read_rows(self.csv_path)
        newest = {r["path"]: i for i, r in enumerate(rows)}
        header = self.journal_path.read_bytes().split(b"\n", 1)[0] + b"\n"
        atomic_write_bytes(self.journal_path, header)
        if len(newest) == len(rows):
            return
        keep = [rows[i] for i in sorted(newest.values())]
        text = ",".join(getattr(self, "fields", FIELDS)) + "\n" + self._csv_text(keep)
        atomic_write_bytes(self.csv_path, text.encode(ENCODING, NAME_ERRORS))

    def _fsync_dests(self) -> None:
        for d in DECISIONS:
            fsync_dir(self.out / d)

    # ------------------------------------------------------------------ main loop
    def _check_inside(self, dest: Path) -> None:
        """Refuse a destination whose folder resolves outside ``out/<decision>`` (a symlinked
        ``normal/`` or sub-folder would write the images somewhere else)."""
        rel = dest.relative_to(self.out)
        base = self.out / rel.parts[0]
        real_base, real_parent = base.resolve(), dest.parent.resolve()
        if real_base != base or (real_parent != real_base and real_base not in real_parent.parents):
            raise InsightADError(f"{dest.parent}: resolves to {real_parent}, outside the output folder {self.out} "
                                 "(a symbolic link?); remove the link or choose another --out")

    def _destination(self, decision: str, rel: Path) -> Path:
        """``out/<decision>/<relative path>``, numbered when the name is taken (never overwrites)."""
        dest = self.out / decision / rel
        self._check_inside(dest)
        n = 1
        while dest.exists() or dest in self._claimed:
            dest = dest.with_name(f"{rel.stem}-{n}{rel.suffix}")
            n += 1
        self._claimed.add(dest)
        return dest

    def _pending(self, done: list[dict[str, Any]]) -> list[Path]:
        """The images to sort, counting the others: an image is skipped only when the last row of its path
        is a decision for a file of its identity (size, mtime_ns); an earlier error is tried again."""
        last = {r["path"]: r for r in done}
        todo: list[Path] = []
        for rel in self._walk():
            ident = file_identity(self.src / rel)
            row = last.get(str(self.src / rel))
            if row is None:
                pass
            elif row["decision"] == "error":
                self.summary.retried += 1
            elif (_identity_of(row) or ident) == ident and ident is not None:
                self.summary.skipped += str(self.src / rel) not in self._recovered
                continue
            else:
                self.summary.changed += 1
                if not self.move and row["decision"] in DECISIONS and row.get("destination"):
                    self._replaces[rel] = row["destination"]
            self._ids[rel] = ident
            todo.append(rel)
        return todo

    def _batch(self, rels: list[Path]) -> None:
        paths = [self.src / r for r in rels]
        self._place(rels, self.det.predict(paths, maps=False, strict=False, threshold=self.threshold))

    def _place(self, rels: list[Path], pred: Any) -> None:
        """Journal the decisions of a scored batch, transfer the files, then write their CSV rows."""
        paths = [self.src / r for r in rels]
        intents: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        for i, (rel, path) in enumerate(zip(rels, paths)):
            if i in pred.errors:
                rows.append(self._row(path, float("nan"), float("nan"), "error", error=pred.errors[i],
                                      ident=self._ids.get(rel)))
                continue
            decision = "anomalous" if pred.labels[i] else "normal"
            dest = self._destination(decision, rel)
            ident = self._ids.get(rel)
            intents.append({"kind": "intent", "path": str(path), "dest": dest.relative_to(self.out).as_posix(),
                            "score": float(pred.scores[i]), "score_normalized": float(pred.scores_normalized[i]),
                            "decision": decision, "size": ident[0] if ident else None,
                            "mtime_ns": ident[1] if ident else None, "replaces": self._replaces.get(rel)})
        if intents:
            self._append(self.journal_path, "".join(json.dumps(it) + "\n" for it in intents))
        self._stage("intents", rels[0].as_posix())
        for it in intents:
            if not self.journal_path.is_file():  # not into a folder made again where the run's was removed
                raise _gone(self.journal_path)
            try:
                _transfer(Path(it["path"]), self.out / it["dest"], self.move)
            except FileNotFoundError:  # deleted (or moved away) after it was scored: an error row, not a crash
                rows.append(self._row(Path(it["path"]), it["score"], it["score_normalized"], "error",
                                      error=f"{it['path']}: disappeared from the input folder before it was "
                                      f"{'moved' if self.move else 'copied'}", ident=_identity_of(it)))
                continue
            self._stage("transferred", it["path"])
            self._drop_replaced(it)
            rows.append(self._row(Path(it["path"]), it["score"], it["score_normalized"], it["decision"], it["dest"],
                                  ident=_identity_of(it)))
        self._fsync_dests()
        if self.move:
            for parent in {p.parent for p in paths}:
                fsync_dir(parent)
        self._append(self.csv_path, self._csv_text(rows))
        for r in rows:
            self._count(r["decision"], r["error"])
        self._claimed.clear()

    def _stage(self, stage: str, what: str) -> None:
        if self.hook is not None:
            self.hook(stage, what)

    def _walk(self) -> Iterator[Path]:
        """Image files of the input folder, relative to it, in a stable order."""
        self.summary.not_images = []  # said by the CLI (data.images.not_scored_note): they stay where they are
        return (p.relative_to(self.src) for p in iter_images(self.src, skipped=self.summary.not_images))

    def run(self) -> SortSummary:
        """Sort every image not finished yet; resumable after any interruption."""
        t0 = time.perf_counter()
        self._check_outputs()
        _journal_header(self.journal_path)  # a file sort did not write is refused before the lock file is added
        _check_csv_columns(self.csv_path)
        self._check_images()
        with folder_lock(self.out, "insightad sort"):  # two runs on one --out would each copy everything
            return self._run_locked(t0)

    def _check_images(self) -> None:
        """A new sort of a folder without images is refused before its lock, journal or CSV is written: a refused
        run leaves the output folder as it found it (the CLI removes the folder its checks made)."""
        if os.path.lexists(self.journal_path) or os.path.lexists(self.csv_path):
            return  # an earlier run's: its rows are still read (and an emptied folder is not an error then)
        if next(self._walk(), None) is None:
            self._refuse_no_images()

    def _refuse_no_images(self) -> None:
        raise InsightADError(no_images_message(self.src, self.summary.not_images, "sort takes images by their "
                                               "names: rename them to sort them"))

    def _check_outputs(self) -> None:
        """Refuse before any work when ``out/normal`` or ``out/anomalous`` resolves elsewhere."""
        for d in DECISIONS:
            base = self.out / d
            if base.is_symlink() or (base.exists() and base.resolve() != base):
                raise InsightADError(f"{base}: resolves to {base.resolve()}, outside the output folder {self.out} "
                                     "(a symbolic link?); remove the link or choose another --out")

    def _run_locked(self, t0: float) -> SortSummary:
        from tqdm import tqdm

        done, intents = self._open()
        self._recover(intents, done)
        rels = self._pending(done)
        if not rels and not done:
            self._refuse_no_images()
        bar = tqdm(total=len(rels), desc="sort", unit="img", disable=not self.progress)
        try:
            if self.scorer is not None:  # scored elsewhere (Ray), chunk by chunk; placed here, one chunk at a time
                for part, pred in self.scorer([self.src / r for r in rels]):
                    self._place([p.relative_to(self.src) for p in part], pred)
                    bar.update(len(part))
            for a in range(0, len(rels), self.batch_size) if self.scorer is None else []:
                self._batch(rels[a:a + self.batch_size])
                bar.update(len(rels[a:a + self.batch_size]))
        finally:
            bar.close()
        self._compact()
        self.summary.seconds = time.perf_counter() - t0
        return self.summary
