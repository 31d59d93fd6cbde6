"""The results of a batch job: a Parquet table, its committed part files, and the lock that keeps one writer."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from insightad.errors import InsightADError
from insightad.io import FORMULA_START, atomic_write, csv_cell, file_lock, lock_beside, remove_temporaries
from insightad.outputs import check_output_file

SCHEMA = pa.schema([
    ("path", pa.string()),
    ("path_bytes", pa.binary()),
    ("score", pa.float64()),
    ("score_normalized", pa.float64()),
    ("anomalous", pa.bool_()),
    ("threshold", pa.float64()),
    ("error", pa.string()),
    ("model_sha256", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("map", pa.string()),
    ("overlay", pa.string()),
    # the local file's identity when it was scored (null for a URL, or a table of an older version)
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
])


# a committed row: (threshold, is error, (size, mtime_ns) or None, map file or None, overlay file or None)
Done = tuple[float, bool, "tuple[int, int] | None", "str | None", "str | None"]


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with ``schema``'s columns, those a table of an older version lacks filled with nulls."""
    cols = [t.column(f.name) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, names=schema.names).cast(schema)


def _guarded(t: pa.Table) -> pa.Table:
    """``t`` with every text cell as ``io.csv_cell`` writes it (a path or error a spreadsheet would run as a
    formula gets a leading '): what ``--csv`` holds. Only a column with a cell that starts like one goes through
    Python (a table of millions of absolute paths is passed over at Arrow speed)."""
    import pyarrow.compute as pc

    starts = pa.array([*FORMULA_START, "'"])
    for i, f in enumerate(t.schema):
        if not pa.types.is_string(f.type):
            continue
        if not pc.any(pc.is_in(pc.utf8_slice_codeunits(t.column(i), 0, 1), value_set=starts)).as_py():
            continue
        cells = [None if v is None else csv_cell(v) for v in t.column(i).to_pylist()]
        t = t.set_column(i, f, pa.array(cells, f.type))
    return t


@dataclass
class ResultsStore:
    """``out`` (the merged Parquet table), ``out.parts/`` (committed chunks) and ``out.lock`` (beside the file a
    symbolic link ``out`` points to)."""

    out: Path
    csv: Path | None = None
    _seq: int = 0

    @property
    def table(self) -> Path:
        """The file ``out`` names once symbolic links are followed (what ``atomic_write`` replaces): the parts and
        the lock go beside it, so two runs given two names of one table (a link and its target) share one lock."""
        return Path(os.path.realpath(self.out))

    @property
    def parts_dir(self) -> Path:
        return self.table.with_name(self.table.name + ".parts")

    @property
    def lock_path(self) -> Path:
        return self.table.with_name(self.table.name + ".lock")

    @property
    def csv_lock_path(self) -> Path | None:
        """The lock of ``csv``, beside the file it names once symbolic links are followed (None: no --csv)."""
        return None if self.csv is None else lock_beside(self.csv)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock of ``out`` and, with --csv, that of the CSV: two runs writing either file (two tables
        given one --csv included) are refused at once rather than replacing each other's CSV."""
        with file_lock(self.lock_path, str(self.out)):
            csv_lock = self.csv_lock_path
            if csv_lock is None:
                yield
                return
            with file_lock(csv_lock, str(self.csv), "another run is writing this --csv", "--csv"):
                yield

    def check(self, inputs: Sequence[str | Path] = ()) -> None:
        """Refuse outputs that cannot be written, or that would overwrite one of ``inputs`` (the model, the
        input list, an image) or land inside an input folder, before any work starts."""
        check_output_file(self.out, "--out", inputs=inputs)
        if self.csv is not None:
            if self.csv.resolve() == self.out.resolve():
                raise InsightADError(f"{self.csv}: --csv must not be the --out results table; choose another name")
            check_output_file(self.csv, "--csv", suffix=".csv", inputs=[*inputs, self.out])
        if self.out.exists():
            try:
                got = pq.read_schema(self.out)
            except Exception:  # noqa: BLE001
                raise InsightADError(f"{self.out}: exists and is not a Parquet file; choose another --out") from None
            if "path_bytes" not in got.names or "model_sha256" not in got.names:
                raise InsightADError(f"{self.out}: exists and is not an insightad batch results table; "
                                     "choose another --out")

    def remove_leftovers(self) -> None:
        """Remove the temporaries of parts and of ``out`` that a run killed while writing them left behind (they
        would stay forever: part names are never reused, and they keep the parts folder from being removed).
        Called with the lock held: no other writer of these names is alive."""
        import glob

        if self.parts_dir.is_dir():
            remove_temporaries(self.parts_dir, "part-*", older_than=0)
        remove_temporaries(self.table.parent, glob.escape(self.table.name), older_than=0)

    def _part_files(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """The merged table and every committed part, in commit order (duplicates not yet removed)."""
        tables = [pq.read_table(self.out, columns=columns)] if self.out.exists() else []
        tables += [pq.read_table(p, columns=columns) for p in self._part_files()]
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return pa.concat_tables([_conform(t, schema) for t in tables]) if tables else schema.empty_table()

    def done(self, model_sha: str) -> dict[bytes, Done]:
        """path bytes -> (threshold, is error, (size, mtime_ns) or None, map, overlay) of the newest row
        committed for this model (the one ``consolidate`` keeps)."""
        t = self.read_all(["path_bytes", "model_sha256", "threshold", "error", "size", "mtime_ns", "map", "overlay"])
        out: dict[bytes, Done] = {}
        for p, m, thr, err, size, mtime, map_, overlay in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            if m == model_sha:
                ident = None if size is None or mtime is None else (size, mtime)
                out[p] = (thr, err is not None, ident, map_, overlay)
        return out

    def commit(self, table: pa.Table) -> Path:
        """Write one chunk's rows as a part file: temp name, fsync, rename, fsync the folder."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.parquet"
        target = self.parts_dir / name
        atomic_write(target, lambda tmp: pq.write_table(table.cast(SCHEMA), tmp))
        return target

    def consolidate(self) -> pa.Table:
        """Merge ``out`` and the parts (the newest row of each (path, model) wins: a retried error or a
        changed file replaces its old row; a part repeating merged rows repeats them unchanged), write
        ``out`` (and the CSV) atomically, then delete the parts: a kill at any point leaves nothing lost
        or duplicated."""
        parts = self._part_files()
        t = self.read_all()
        last: dict[tuple[bytes, str], int] = {}
        for i, key in enumerate(zip(t.column("path_bytes").to_pylist(), t.column("model_sha256").to_pylist())):
            last[key] = i
        keep = sorted(last.values())
        t = t.take(pa.array(keep, pa.int64())) if len(keep) != t.num_rows else t
        t = t.sort_by([("model_sha256", "ascending"), ("path_bytes", "ascending")])
        atomic_write(self.out, lambda tmp: pq.write_table(t, tmp))
        if self.csv is not None:
            import pyarrow.csv as pacsv

            shown = _guarded(t.drop_columns(["path_bytes"]))
            atomic_write(self.csv, lambda tmp: pacsv.write_csv(shown, tmp))
        for p in parts:
            p.unlink(missing_ok=True)
        if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()
        return t
