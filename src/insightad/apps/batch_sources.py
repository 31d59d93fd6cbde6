"""Sources of a batch job: a folder (recursive), a text file of paths, or a glob; local or fsspec URLs.

Paths are kept as their exact bytes, so a name that is not valid UTF-8 is carried unchanged.
"""

from __future__ import annotations

import codecs
import glob as globlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from insightad.data.images import IMAGE_EXTENSIONS, is_image_file, no_images_message
from insightad.errors import InsightADError

GLOB_CHARS = ("*", "?", "[")


def is_url(path: bytes) -> bool:
    return b"://" in path


@dataclass
class Source:
    """The inputs of a job (exact path bytes, in order, no repeats) and the root their names mirror from."""

    paths: list[bytes]
    root: bytes
    not_images: list[bytes] = field(default_factory=list)  # files of a folder passed over by their names
    repeats: int = 0  # lines of a list naming a path listed before (scored once)

    def relative(self, path: bytes) -> bytes:
        rel = path[len(self.root):] if self.root and path.startswith(self.root) else path
        return rel.lstrip(b"/") or os.path.basename(path)


def _walk(root: bytes, skipped: list[bytes] | None = None) -> Iterator[bytes]:
    """Image files under ``root`` (regular files, symlinks to files included), sorted, hidden skipped;
    ``skipped`` collects the other visible files (other extensions, ``*_mask.*``), as ``io.iter_images`` does."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if is_image_file(Path(os.fsdecode(name))) and os.path.isfile(p):
                yield p
            elif skipped is not None and not name.startswith(b".") and os.path.isfile(p):
                skipped.append(p)


def _unique(paths: Sequence[bytes]) -> list[bytes]:
    return list(dict.fromkeys(paths))


def _listed_source(paths: list[bytes], root: bytes) -> Source:
    """The source a list names: each path once, in the order first listed, counting the lines that repeat one."""
    unique = _unique(paths)
    return Source(unique, root, repeats=len(paths) - len(unique))


def _listed(data: bytes, is_file: Callable[[bytes], bool]) -> list[bytes]:
    """The paths a list file names, one a line (spaces around a name dropped): blank lines and comments (``#``
    first) left out, except a ``#`` line that names an existing file (``#001.png`` is an image, not a comment);
    a UTF-8 byte-order mark (what Windows editors put first) is no part of the first name."""
    lines = (ln.strip() for ln in data.removeprefix(codecs.BOM_UTF8).splitlines())
    return [ln for ln in lines if ln and (not ln.startswith(b"#") or is_file(ln))]


def _beside(folder: str, line: bytes) -> bytes:
    """A line of a list read from a URL: a URL or an absolute path as it is, a relative path from the list's
    folder (``folder``: the list's URL up to its last /), as for a local list."""
    if is_url(line) or line.startswith(b"/"):
        return line
    return os.fsencode(folder) + line


def _url_source(spec: str) -> Source:
    """A source on an fsspec file system (``s3://``, ``gs://``, ``file://``...): folder, glob or list."""
    proto = spec.split("://", 1)[0] + "://"
    try:
        import fsspec

        fs, where = fsspec.core.url_to_fs(spec)
    except ImportError as e:  # fsspec, or the package of this protocol (s3fs, gcsfs; requests and aiohttp for http)
        raise InsightADError(f"{spec}: reading {proto} inputs needs a package this install does not have ({e}); "
                             "install it, or copy the images to a local folder") from None
    except ValueError as e:  # 'Protocol not known: htp'
        raise InsightADError(f"{spec}: {e} (expected a local path, or a URL of a file system fsspec knows: "
                             "s3://, gs://, file://, ...)") from None
    if any(c in where for c in GLOB_CHARS):
        found = [p for p in fs.glob(where) if p.lower().endswith(IMAGE_EXTENSIONS)]
        root = where.split("*")[0].rsplit("/", 1)[0]
    elif fs.isdir(where):
        found = [p for p in fs.find(where) if is_image_file(Path(p))]
        root = where
    elif fs.isfile(where):
        with fs.open(where, "rb") as f:
            data = f.read()
        here = where.rsplit("/", 1)[0] + "/" if "/" in where else ""
        folder = proto + here
        listed = _listed(data, lambda ln: fs.isfile(here + os.fsdecode(ln)))
        if not listed:
            raise InsightADError(f"{spec}: the list of paths is empty (expected one image path a line)")
        return _listed_source([_beside(folder, ln) for ln in listed], b"")
    else:
        raise InsightADError(f"{spec}: no such folder, file or glob")
    paths = [os.fsencode(p if "://" in p else proto + p) for p in sorted(found)]
    return Source(_unique(paths), os.fsencode(proto + root))


def source_inputs(spec: str, source: Source, lists: bool = True) -> list[str]:
    """What a batch output must not overwrite or lie inside: the folder (its images are in it), or the list
    file (unless ``lists`` is false: only the images) and every local image it (or a glob) names. URLs are
    not local files and are left out."""
    if "://" in spec:
        return []
    given = os.path.expanduser(spec)
    if os.path.isdir(given):
        return [given]
    listed = [os.fsdecode(p) for p in source.paths if not is_url(p)]
    return [given, *listed] if lists and os.path.isfile(given) else listed


def list_source(spec: str) -> Source:
    """A folder (recursive), a text file of paths (one a line; relative ones from the file's folder; see
    :func:`_listed`), or a glob (``**`` recursive). A listed path that does not exist becomes an error row later."""
    if "://" in spec:
        return _url_source(spec)
    raw = os.fsencode(os.path.expanduser(spec))
    if any(c.encode() in raw for c in GLOB_CHARS) and not os.path.exists(raw):
        found = sorted(p for p in globlib.glob(raw, recursive=True)
                       if os.path.isfile(p) and is_image_file(Path(os.fsdecode(p))))
        prefix = raw[:min(raw.find(c.encode()) for c in GLOB_CHARS if c.encode() in raw)]
        root = os.path.dirname(prefix)
        if not found:
            raise InsightADError(f"{spec}: the glob matches no image files "
                                 f"(expected {', '.join(IMAGE_EXTENSIONS)})")
        return Source(_unique([os.path.abspath(p) for p in found]), os.path.abspath(root or b"."))
    if os.path.isdir(raw):
        skipped: list[bytes] = []
        found = list(_walk(os.path.abspath(raw), skipped))
        if not found:
            raise InsightADError(no_images_message(spec, skipped, "list them in a text file (--input) to score "
                                                   "them whatever their names"))
        return Source(found, os.path.abspath(raw), skipped)
    if os.path.isfile(raw):
        with open(raw, "rb") as f:
            head = f.read(4096)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise InsightADError(f"{spec}: a list of paths saved as UTF-16 text; save it as UTF-8 (one image path "
                                 "a line)")
        if is_image_file(Path(spec)) or b"\x00" in head:
            raise InsightADError(f"{spec}: expected a folder, a glob or a text file of image paths (one a line), "
                                 "got an image or a binary file")
        base = os.path.dirname(os.path.abspath(raw))
        with open(raw, "rb") as f:
            listed = _listed(f.read(), lambda ln: os.path.isfile(os.path.join(base, ln)))
        paths = [ln if is_url(ln) else os.path.normpath(os.path.join(base, ln)) for ln in listed]
        if not paths:
            raise InsightADError(f"{spec}: the list of paths is empty (expected one image path a line)")
        local = [p for p in paths if not is_url(p)]
        root = os.path.commonpath([os.path.dirname(p) for p in local]) if local else b""
        return _listed_source(paths, root)
    raise InsightADError(f"{spec}: no such folder, file or glob")
