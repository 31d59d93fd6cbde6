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
cross-file-system move: the source is deleted once the sizes match), then the walk goes on, skipping
every image with a row. So no image is lost, none ends up twice, and no row is written twice.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insightad.errors import InsightADError
from insightad.io import TMP_SUFFIX, durable_copy, folder_lock, fsync_dir, fsync_file, iter_images
from insightad.outputs import check_output_dir

JOURNAL = ".insightad-sort.journal"
CSV_NAME = "results.csv"
# anomalous: true/false (empty for an error), the name every machine-readable output uses; decision: the folder
FIELDS = ("path", "score", "score_normalized", "anomalous", "decision", "destination", "error")
DECISIONS = ("normal", "anomalous")
# File names are bytes on POSIX: a name that is not valid UTF-8 reaches Python as lone surrogates, and
# ``surrogateescape`` writes those back as the original bytes, so the CSV and the journal round-trip it.
ENCODING, NAME_ERRORS = "utf-8", "surrogateescape"

Hook = Callable[[str, str], None]  # (stage, relative path): test hook for simulated crashes
# paths to score -> (paths of a chunk, its Prediction) as chunks finish, in any order (e.g. apps.batch_ray)
Scorer = Callable[[list[Path]], Iterator[tuple[list[Path], Any]]]


@dataclass
class SortSummary:
    """What one run did (``skipped``: images finished by an earlier run)."""

    out: Path
    csv: Path
    move: bool
    normal: int = 0
    anomalous: int = 0
    errors: int = 0
    skipped: int = 0
    recovered: int = 0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.normal + self.anomalous + self.errors

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "csv": str(self.csv), "mode": "move" if self.move else "copy",
                "normal": self.normal, "anomalous": self.anomalous, "errors": self.errors, "skipped": self.skipped,
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

    # ------------------------------------------------------------------ journal and CSV
    def _header(self) -> dict[str, Any]:
        return {"kind": "header", "input": str(self.src), "mode": "move" if self.move else "copy",
                "threshold": self.threshold, "model": getattr(self.det, "model_path_", None),
                "method": self.det.method}

    def _open(self) -> tuple[set[str], list[dict[str, Any]]]:
        """Create or reopen the journal and CSV; returns (finished paths, intents)."""
        self.out.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.journal_path)
        _cut_torn_tail(self.csv_path)
        intents: list[dict[str, Any]] = []
        if self.journal_path.exists() and self.journal_path.stat().st_size:
            lines = self.journal_path.read_text(encoding=ENCODING, errors=NAME_ERRORS).splitlines()
            header = json.loads(lines[0])
            self._check_same_run(header)
            intents = [json.loads(x) for x in lines[1:] if x.strip()]
        else:
            self._append(self.journal_path, json.dumps(self._header()) + "\n")
        done: set[str] = set()
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            with open(self.csv_path, newline="", encoding=ENCODING, errors=NAME_ERRORS) as f:
                reader = csv.DictReader(f)
                done = {row["path"] for row in reader}
                self.fields = tuple(reader.fieldnames or FIELDS)  # a run begun by an older version keeps its columns
        else:
            self._append(self.csv_path, ",".join(FIELDS) + "\n")
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
    def _append(path: Path, text: str) -> None:
        """Append and fsync: the line is on disk before the caller moves on."""
        with open(path, "a", encoding=ENCODING, errors=NAME_ERRORS, newline="") as f:
            f.write(text)
            fsync_file(f)

    def _csv_text(self, rows: list[dict[str, Any]]) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=getattr(self, "fields", FIELDS), lineterminator="\n",
                           extrasaction="ignore")
        for r in rows:
            w.writerow(r)
        return buf.getvalue()

    def _row(self, path: Path, score: float, normalized: float | None, decision: str, dest: str = "",
             error: str = "") -> dict[str, Any]:
        fmt = (lambda v: "" if v is None or not np.isfinite(v) else f"{v:.9g}")
        anomalous = {"anomalous": "true", "normal": "false"}.get(decision, "")
        return {"path": str(path), "score": fmt(score), "score_normalized": fmt(normalized), "anomalous": anomalous,
                "decision": decision, "destination": dest, "error": error}

    def _count(self, decision: str, error: str = "") -> None:
        if decision == "error":
            self.summary.errors += 1
            if len(self.summary.error_examples) < 5:
                self.summary.error_examples.append(error)
        else:
            setattr(self.summary, decision, getattr(self.summary, decision) + 1)

    # ------------------------------------------------------------------ recovery
    def _recover(self, intents: list[dict[str, Any]], done: set[str]) -> None:
        """Finish every intent that has no CSV row (a run was interrupted between the two)."""
        for pattern in (f".*{TMP_SUFFIX}", ".*.partial"):  # ours, and those of versions before io.atomic_write
            for partial in list(self.out.rglob(pattern)):
                partial.unlink(missing_ok=True)
        rows = []
        seen: set[str] = set()
        for it in intents:
            if it["path"] in done or it["path"] in seen:
                continue
            seen.add(it["path"])
            src, dest = Path(it["path"]), self.out / it["dest"]
            error = ""
            if dest.exists() and src.exists() and self.move:
                if dest.stat().st_size == src.stat().st_size:
                    os.unlink(src)
                else:
                    _transfer(src, dest, self.move)
            elif not dest.exists() and src.exists():
                _transfer(src, dest, self.move)
            elif not dest.exists():
                error = "the image disappeared from the input folder before it was sorted"
            decision = "error" if error else it["decision"]
            rows.append(self._row(src, it["score"], it.get("score_normalized"), decision,
                                  "" if error else it["dest"], error))
            self._count(decision, error)
            done.add(it["path"])
        if rows:
            self._fsync_dests()
            self._append(self.csv_path, self._csv_text(rows))
            self.summary.recovered = len(rows)

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
                rows.append(self._row(path, float("nan"), float("nan"), "error", error=pred.errors[i]))
                continue
            decision = "anomalous" if pred.labels[i] else "normal"
            dest = self._destination(decision, rel)
            intents.append({"kind": "intent", "path": str(path), "dest": dest.relative_to(self.out).as_posix(),
                            "score": float(pred.scores[i]), "score_normalized": float(pred.scores_normalized[i]),
                            "decision": decision})
        if intents:
            self._append(self.journal_path, "".join(json.dumps(it) + "\n" for it in intents))
        self._stage("intents", rels[0].as_posix())
        for it in intents:
            try:
                _transfer(Path(it["path"]), self.out / it["dest"], self.move)
            except FileNotFoundError:  # deleted (or moved away) after it was scored: an error row, not a crash
                rows.append(self._row(Path(it["path"]), it["score"], it["score_normalized"], "error",
                                      error=f"{it['path']}: disappeared from the input folder before it was "
                                      f"{'moved' if self.move else 'copied'}"))
                continue
            self._stage("transferred", it["path"])
            rows.append(self._row(Path(it["path"]), it["score"], it["score_normalized"], it["decision"], it["dest"]))
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
        return (p.relative_to(self.src) for p in iter_images(self.src))

    def run(self) -> SortSummary:
        """Sort every image not finished yet; resumable after any interruption."""
        t0 = time.perf_counter()
        self._check_outputs()
        with folder_lock(self.out, "insightad sort"):  # two runs on one --out would each copy everything
            return self._run_locked(t0)

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
        todo = sum(1 for r in self._walk() if str(self.src / r) not in done)
        self.summary.skipped = len(done) - self.summary.recovered
        if todo == 0 and not done:
            raise InsightADError(f"{self.src}: no images found (expected .png, .jpg, .jpeg, .bmp, .tif or .tiff files)")
        bar = tqdm(total=todo, desc="sort", unit="img", disable=not self.progress)
        batch: list[Path] = []
        try:
            if self.scorer is not None:  # scored elsewhere (Ray), chunk by chunk; placed here, one chunk at a time
                rels = [r for r in self._walk() if str(self.src / r) not in done]
                for part, pred in self.scorer([self.src / r for r in rels]):
                    self._place([p.relative_to(self.src) for p in part], pred)
                    bar.update(len(part))
            for rel in self._walk() if self.scorer is None else []:
                if str(self.src / rel) in done:
                    continue
                batch.append(rel)
                if len(batch) == self.batch_size:
                    self._batch(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                self._batch(batch)
                bar.update(len(batch))
        finally:
            bar.close()
        self.summary.seconds = time.perf_counter() - t0
        return self.summary
