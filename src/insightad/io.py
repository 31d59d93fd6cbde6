"""Files, written so that nothing is ever half-written or lost, and the one folder walker.

- ``atomic_write``: write to a hidden temporary name beside the target, fsync the file, rename, fsync
  the folder: a reader (or a machine that lost power) sees the old file or the new one, never half.
  A symbolic link is followed: the file it points to is replaced, the link is kept.
  Temporaries of our own naming left by a killed writer are removed on the next write.
- ``durable_copy``: the same for copying a file.
- ``iter_images`` / ``list_images``: every image file under a folder, sorted, regular files only
  (a FIFO named ``x.png`` would block a reader forever), hidden files and folders skipped.
- ``folder_lock``: an exclusive lock on a folder that two processes could share (sort, batch).
- ``csv_cell`` / ``csv_value`` / ``csv_text``: the one way a text cell goes into (and comes back out of) every
  CSV the tool writes, guarded against spreadsheet formula injection.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from insightad.errors import InsightADError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TMP_SUFFIX = ".insightad-tmp"
STALE_TMP_SECONDS = 3600.0  # a temporary older than this belongs to no live writer


def has_image_name(path: Path) -> bool:
    """Named as an image file (by extension) and not hidden: images and their masks alike."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """An image by extension, not a mask (``*_mask.*``) and not hidden."""
    return has_image_name(path) and not path.stem.endswith("_mask")


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following links); False for folders, FIFOs, sockets, devices, missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def is_safetensors_file(path: str | Path) -> bool:
    """Whether a regular file starts as a safetensors file does (an 8-byte little-endian header length that fits
    the file, then the JSON header's ``{``): a model, backbone or checkpoint file, whatever its name."""
    if not is_regular_file(Path(path)):  # a FIFO would block the read
        return False
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def looks_like_onnx(path: str | Path) -> bool:
    """Whether a file that is not a safetensors file starts as an ONNX graph does (its first protobuf field, the
    IR version: tag 0x08 and a small number): a hint for messages, never a reason to load anything."""
    if not is_regular_file(Path(path)):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and 0 < head[1] < 32


def iter_images(root: str | Path, skip_dirs: Iterable[str] = (), skipped: list[Path] | None = None,
                not_files: list[Path] | None = None) -> Iterator[Path]:
    """Image files under ``root``, folder by folder in sorted order; hidden entries and folders named in
    ``skip_dirs`` (compared lower-case) are skipped; only regular files are yielded. ``skipped`` collects the
    other visible regular files (other extensions, ``*_mask.*``), so a caller can say what it left out;
    ``not_files`` the image names that are no regular file (a broken link, a FIFO)."""
    skip = {d.lower() for d in skip_dirs}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in skip)
        for name in sorted(filenames):
            p = here / name
            if is_image_file(p) and is_regular_file(p):
                yield p
            elif not_files is not None and is_image_file(p):
                not_files.append(p)
            elif skipped is not None and not name.startswith(".") and is_regular_file(p):
                skipped.append(p)


def printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (which reach Python as lone
    surrogates) shown as ``\\xNN``. What a figure, a UTF-8 report file or an Arrow column can hold."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a regular file, else one line: not found, a folder, or a pipe/socket/device (reading a FIFO
    would block forever, and /dev/zero is not "empty"). ``what`` names the expected file ("model file")."""
    path = Path(path)
    article = "an" if what[:1].lower() in "aeiou" else "a"
    if not os.path.lexists(path) or (path.is_symlink() and not path.exists()):
        raise InsightADError(f"{path}: {what} not found")
    if path.is_dir():
        raise InsightADError(f"{path}: is a folder, expected {article} {what}")
    if not is_regular_file(path):
        raise InsightADError(f"{path}: not a regular file (a pipe, socket or device); expected {article} {what}")
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex): how model files are named in caches, results and threshold files."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str | Path | bytes) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it cannot be stat'ed: what resumable jobs (sort, batch)
    compare to tell a file they already handled from a new one that took its name."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def list_images(root: str | Path, skip_dirs: Iterable[str] = (), skipped: list[Path] | None = None,
                not_files: list[Path] | None = None) -> list[Path]:
    """``iter_images`` as one sorted list (the order dataset splits are drawn in)."""
    return sorted(iter_images(root, skip_dirs, skipped, not_files))


# ------------------------------------------------------------------------------- durable writes
def fsync_file(f: IO[Any]) -> None:
    """Flush ``f`` and make it durable; a failure (a full disk) names the file."""
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            e.filename = getattr(f, "name", None)
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | Path, name: str, older_than: float = STALE_TMP_SECONDS) -> None:
    """Remove our own temporaries for the file ``name`` in ``folder`` (a glob pattern such as ``part-*``, or
    ``glob.escape``'d) left behind by a writer that was killed: those older than ``older_than`` seconds (0: all,
    for a caller that holds the lock every writer of those names takes). A temporary folder (the ONNX
    exporter's twin of a graph) goes with what it holds."""
    now = time.time()
    try:
        for p in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - p.lstat().st_mtime >= older_than:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    except OSError:
        pass


def atomic_write(path: str | Path, write: Callable[[Path], Any],
                 ready: Callable[[Path], Any] | None = None) -> None:
    """Call ``write(tmp_path)``, fsync it, rename it over ``path`` and fsync the folder. A symbolic link is
    followed: its target is replaced (temporary in the target's folder) and the link stays a link.
    ``ready(tmp_path)``: called on the finished file just before the rename (e.g. to record its hash in
    another file); if it raises, ``path`` is left as it was."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path.parent, glob.escape(path.name))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        if ready is not None:
            ready(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # a failed write or fsync: say which output
            e.filename = str(path)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def durable_copy(src: str | Path, dest: str | Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary name: ``dest`` is whole or absent."""
    dest = Path(dest)

    def write(tmp: Path) -> None:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        shutil.copystat(src, tmp)

    atomic_write(dest, write)


# --------------------------------------------------------------------------------------- locks
LOCK_NAME = ".insightad.lock"


def _locked_fd(lock_path: Path, what: str, busy: str | None, flag: str) -> int:
    """A descriptor of ``lock_path`` holding its exclusive lock. The file the lock is taken on must still be the
    one the name holds (a holder that finished removes its file: a run that opened it just before would
    otherwise lock a removed file while a third run locks the new one)."""
    import fcntl

    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise InsightADError(f"{what}: {busy or 'another run is writing it'} (lock {lock_path} held by pid "
                                 f"{holder}); wait for it to finish or choose another {flag}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            named = os.stat(lock_path)
        except FileNotFoundError:
            named = None
        held = os.fstat(fd)
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # removed (or replaced) by the holder that just finished: lock the file the name holds now


_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds (not its forked children)


def _forget_locks_in_child() -> None:
    """In a child made by fork (DataLoader and multiprocessing workers), close the lock descriptors it inherited:
    an flock lock is held while any process has its file open, so a worker left running by a killed run kept
    the next run out with a message naming a pid that had ended; and a child unwinding a ``file_lock`` block
    must not remove its parent's lock file."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


@contextlib.contextmanager
def file_lock(lock_path: str | Path, what: str, busy: str | None = None, flag: str = "--out") -> Iterator[Path]:
    """Hold an exclusive ``fcntl`` lock on ``lock_path`` for the duration; a second holder is refused at
    once with one line naming ``what``, the holder's pid and the ``flag`` to change. The lock file is removed on
    release. The lock itself is the kernel's: it ends with the process however it ends, so the file a killed holder
    left behind (its pid inside) is taken over by the next run; children it forked do not keep it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked_fd(lock_path, what, busy, flag)
    _HELD_LOCKS.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        if fd in _HELD_LOCKS:  # else: a forked child leaving the block; the lock and its file are the parent's
            _HELD_LOCKS.discard(fd)
            with contextlib.suppress(OSError):  # removed while held: the lock is still released below
                os.unlink(lock_path)  # still held: no other run can be holding this file
            os.close(fd)


def lock_beside(path: str | Path) -> Path:
    """``PATH.lock`` beside the file ``path`` names once links are followed: the lock of that output file."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def output_lock(path: str | Path, flag: str = "--out") -> contextlib.AbstractContextManager[Path]:
    """``file_lock`` on :func:`lock_beside` ``path``: two runs writing one file (a model file: train's --out,
    calibrate's --model), and what goes beside it, are never both under way. ``flag``: the option a refused run
    is told to change."""
    return file_lock(lock_beside(path), str(path), flag=flag)


def folder_lock(folder: str | Path, what: str, flag: str = "--out") -> contextlib.AbstractContextManager[Path]:
    """``file_lock`` on a lock file inside ``folder`` (sort's output folder, evaluate's --report)."""
    return file_lock(Path(folder) / LOCK_NAME, str(folder), f"another {what} is already writing to this folder",
                     flag)


# ----------------------------------------------------------------------------------------- CSV
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes for the start of a formula
# A number without its sign, in every spelling Python's float() reads (1, 1., .5, 1e-3, inf, nan; any case).
UNSIGNED_NUMBER = r"((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|inf|infinity|nan)"
_NUMBER = re.compile(rf"[+-]?{UNSIGNED_NUMBER}", re.IGNORECASE)


def csv_cell(value: str) -> str:
    """A text cell as every CSV the tool writes holds it: one a spreadsheet would run as a formula (starting
    with =, +, -, @, tab or CR, OWASP's CSV-injection advice) is written after a ``'``, and so is one that
    starts with ``'`` itself, so that :func:`csv_value` gives back exactly the text; a plain number (``-1.5``)
    is left as it is. Quoting (commas, quotes, newlines) is the CSV writer's job."""
    if value[:1] == "'" or (value[:1] in FORMULA_START and not _NUMBER.fullmatch(value)):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The text a :func:`csv_cell` holds: the guarding ``'`` removed (``'=x.png`` -> ``=x.png``)."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in (*FORMULA_START, "'") else cell


def csv_text(fields: Sequence[str], rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    """Rows as CSV text (``\\n`` line ends, fields missing from a row left empty, others ignored), every text
    cell through :func:`csv_cell`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(v) if isinstance(v, str) else v for k, v in r.items()})
    return buf.getvalue()
