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


_CREATED: list[Path] = []  # folders the output checks made, deepest first: removed again if the run fails


def _make_folder(folder: Path, flag: str, shown: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise InsightADError(f"{shown}: {flag} cannot be written ({parent} is a file, not a folder)")
    missing = [p for p in [folder, *folder.parents] if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InsightADError(f"{shown}: {flag} cannot be written ({_reason(e)})") from None
    _CREATED.extend(missing)


def remove_created_folders() -> None:
    """Remove the folders the output checks of this run created and nothing was written into: a refused or
    failed run leaves no empty --report or models/ folder behind (a folder holding anything is kept)."""
    while _CREATED:
        try:
            _CREATED.pop(0).rmdir()
        except OSError:
            pass


def keep_created_folders() -> None:
    """The run succeeded: its folders stay."""
    _CREATED.clear()


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


def input_folders(inputs: Iterable[str | Path]) -> dict[Path, bool]:
    """The folders ``inputs`` live in, resolved, each once, mapped to whether it was given as a folder (else
    it is an input file's folder). One ``resolve`` per distinct folder: a list of a million images stays cheap."""
    given: dict[str, bool] = {}
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        if os.path.isdir(text):
            given[text] = True
        else:
            given.setdefault(os.path.dirname(text) or ".", False)
    out: dict[Path, bool] = {}
    for text, is_input in given.items():
        folder = Path(text).resolve()
        out[folder] = out.get(folder, False) or is_input
    return out


def check_apart(path: str | Path, flag: str, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is, holds or lies inside the folder of one of ``inputs`` (an input file's
    folder counts, not only input folders): what it writes would overwrite an input, or be read as one (a
    dataset image) on the next run. One exception: a sub-folder of the working directory is fine when only
    input files lie there (``predict part.png --overlay overlays/``)."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    here = Path.cwd().resolve()
    for folder, is_input in input_folders(inputs).items():
        what = "the input folder" if is_input else "the folder of input files"
        if resolved == folder or (folder in resolved.parents and (is_input or folder != here)):
            raise InsightADError(f"{out}: {flag} must not be or lie inside {what} {folder} (what is written there "
                                 f"would overwrite an input or be read as one); choose {flag} outside it")
        if resolved in folder.parents:
            raise InsightADError(f"{out}: {flag} must not hold {what} {folder} (what is written there would be "
                                 f"read as input); choose {flag} beside it")


def check_output_names(folder: str | Path, names: Iterable[str], flag: str,
                       avoid: Iterable[tuple[str | Path, str]] = ()) -> None:
    """Every ``folder/name`` can be written as a file: none is an existing folder, and none is (or holds) a
    folder in ``avoid`` (``(path, flag)`` pairs: another output folder of the same run). Checked before any
    work: an IsADirectoryError after hours of scoring is a failed run."""
    base = Path(folder).expanduser()
    others = {p.resolve(): (Path(p), f) for p, f in ((Path(p).expanduser(), f) for p, f in avoid)}
    ancestors = {a: other for p, other in others.items() for a in (p, *p.parents)}
    root = base.resolve()
    for name in names:
        target = base / name
        if target.is_dir():
            raise InsightADError(f"{target}: {flag} would write a file here, and this is a folder; "
                                 f"choose another {flag}")
        hit = ancestors.get(root / name)
        if hit is not None:
            raise InsightADError(f"{target}: {flag} would write a file here, on the way to {hit[1]} {hit[0]}; "
                                 f"choose {flag} and {hit[1]} apart")


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
