"""Output paths checked before any work starts: a run that would fail at its last step fails at its first.

Every command that writes calls one of these on each output it was given (or defaults to) before it
loads a model or reads an image: a training run of hours must not end in IsADirectoryError.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from insightad.errors import InsightADError


def _reason(e: OSError) -> str:
    return e.strerror or os.strerror(e.errno or errno.EIO)


def _probe(folder: Path, flag: str, shown: Path) -> None:
    """Create and delete a temporary file in ``folder``: the only sure test that we may write there."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".insightad-probe-", dir=folder)
    except OSError as e:
        raise InsightADError(f"{shown}: {flag} cannot be written ({_reason(e)} in {folder})") from None
    os.close(fd)
    os.unlink(tmp)


def _make_folder(folder: Path, flag: str, shown: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise InsightADError(f"{shown}: {flag} cannot be written ({parent} is a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InsightADError(f"{shown}: {flag} cannot be written ({_reason(e)})") from None


def check_not_input(path: str | Path, flag: str, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is one of ``inputs`` (a file: the same file once symlinks and hard links are
    followed) or lies inside one (a folder): writing it would destroy an input, or feed what this run writes
    back in as input on the next run. One ``stat`` per input: a list of a million images stays cheap."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    try:
        here = os.stat(out)
    except OSError:
        here = None  # not written yet: it cannot be an existing input file
    for given in inputs:
        src = Path(given).expanduser()
        try:
            st = os.stat(src)
        except OSError:
            continue  # a missing input cannot be overwritten
        if stat.S_ISDIR(st.st_mode):
            folder = src.resolve()
            if resolved == folder or folder in resolved.parents:
                raise InsightADError(f"{out}: {flag} must not be inside the input folder {src} (what is written "
                                     f"there would be read as input on the next run); choose {flag} outside it")
        elif here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            raise InsightADError(f"{out}: {flag} would overwrite {src}, an input of this run; choose another name")


def check_output_file(path: str | Path, flag: str, *, suffix: str | None = None,
                      inputs: Iterable[str | Path] = ()) -> Path:
    """``path`` may be written as a file (its folder is created); else one line naming ``flag``.

    An existing file is fine (it is replaced atomically when the work is done); a folder is not, nor
    one of ``inputs`` or a name inside an input folder (:func:`check_not_input`).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InsightADError(f"{path}: {flag} expects a file name, and this is a folder")
    if suffix and path.suffix.lower() != suffix:
        raise InsightADError(f"{flag}: expected a {suffix} file name, got {str(path)!r}")
    check_not_input(path, flag, inputs)
    if path.exists() and not os.access(path, os.W_OK):
        raise InsightADError(f"{path}: {flag} cannot be written (permission denied)")
    folder = path.parent if str(path.parent) else Path(".")
    _make_folder(folder, flag, path)
    _probe(folder, flag, path)
    return path


def check_output_dir(path: str | Path, flag: str, *, inputs: Iterable[str | Path] = ()) -> Path:
    """``path`` is (or is created as) a folder we may write into, not inside one of ``inputs``; else one
    line naming ``flag``."""
    path = Path(path).expanduser()
    check_not_input(path, flag, inputs)
    if path.exists() and not path.is_dir():
        raise InsightADError(f"{path}: {flag} expects a folder, and this is a file")
    _make_folder(path, flag, path)
    _probe(path, flag, path)
    return path
