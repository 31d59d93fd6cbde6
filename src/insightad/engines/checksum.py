"""A graph file's content checksum: the exporter stamps it, a graph is checked against it before it is first used.

An exported graph carries, in its metadata, the sha256 of the whole file read with that value as 64 zeros
(``CONTENT_KEY``). The metadata sits in the file's head, before the large constants (``engines.export``), so
the value is found without parsing the graph, and stamped in place after the file is written. A flipped bit
in the constants or a hand-edited threshold in the metadata no longer scores silently: the check runs when a
graph is first opened (its session-ready copy is then made, and kept for that file's identity; the slow path
checks at every open). Graphs exported before the checksum carry none and open as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from insightad.errors import InsightADError

CONTENT_KEY = "insightad_content_sha256"
UNSTAMPED = b"0" * 64
HEAD_BYTES = 8 * 1024**2  # where the metadata is looked for: the graph's nodes and metadata, not its constants
_CHUNK = 8 * 1024**2
# StringStringEntryProto: key (field 1) then value (field 2, 64 bytes); the key is shorter than 128 bytes.
_ENTRY = b"\x0a" + bytes([len(CONTENT_KEY)]) + CONTENT_KEY.encode() + b"\x12\x40"


def _value_at(path: Path) -> int | None:
    """Offset of the checksum's 64 bytes in the file, or None for a graph that carries none."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    i = head.find(_ENTRY)
    return None if i < 0 else i + len(_ENTRY)


def content_digest(path: Path, at: int) -> str:
    """sha256 of the file with its 64 checksum bytes at ``at`` read as zeros."""
    h = hashlib.sha256()
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            lo, hi = max(at - pos, 0), min(at + len(UNSTAMPED) - pos, len(chunk))
            if lo < hi:
                chunk = chunk[:lo] + UNSTAMPED[: hi - lo] + chunk[hi:]
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


def stamp_content(path: str | Path) -> None:
    """Write the checksum into a graph just exported with ``UNSTAMPED`` as its ``CONTENT_KEY`` metadata."""
    path = Path(path)
    at = _value_at(path)
    if at is None:
        raise InsightADError(f"{path}: no '{CONTENT_KEY}' entry in the graph's metadata to stamp")
    digest = content_digest(path, at).encode()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest)


def check_content(path: str | Path) -> None:
    """Refuse a graph whose content does not match its checksum (damaged, or edited after export)."""
    path = Path(path)
    try:
        at = _value_at(path)
    except OSError:  # unreadable: what opens it says so
        return
    if at is None:
        return
    with open(path, "rb") as f:
        f.seek(at)
        stored = f.read(len(UNSTAMPED))
    if stored != content_digest(path, at).encode():
        raise InsightADError(f"{path}: the graph's content does not match its checksum (damaged or edited after "
                             "it was exported); export it again with 'insightad export'")
