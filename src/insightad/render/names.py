"""The one naming of the per-image files predict writes (overlays, heatmaps): unique within a run, and the
same image gets the same name in each kind (``a_x_overlay.png`` beside ``a_x_heatmap.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def output_names(paths: Sequence[str | Path], kind: str) -> list[str]:
    """``<stem>_<kind>.png`` per image; a name already taken in this run gets the image's folder name in
    front, then a number, so that no image's file overwrites another's (computed before any scoring)."""
    suffix = f"_{kind}.png"
    used: set[str] = set()
    names = []
    for p in map(Path, paths):
        name = f"{p.stem}{suffix}"
        if name in used:
            name = f"{p.parent.name}_{p.stem}{suffix}"
        base, n = name[: -len(suffix)], 2
        while name in used:
            name = f"{base}_{n}{suffix}"
            n += 1
        used.add(name)
        names.append(name)
    return names
