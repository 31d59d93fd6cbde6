"""Anomaly maps as colour PNG images: one ``<stem>_heatmap.png`` per image, comparable across images."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from insightad.errors import InsightADError


def heatmap_rgb(m: np.ndarray, threshold: float | None) -> np.ndarray:
    """A map -> uint8 RGB (jet colours). With a positive threshold the scale is fixed, 0 -> blue,
    the threshold -> green/yellow midpoint, twice the threshold and above -> red, so colours mean
    the same in every image; otherwise the map's own range is used."""
    from matplotlib import colormaps

    m = np.asarray(m, dtype=np.float32)
    if threshold is not None and np.isfinite(threshold) and threshold > 0:
        v = m / (2.0 * threshold)
    else:
        lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
        v = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    rgb = colormaps["jet"](np.clip(np.nan_to_num(v), 0.0, 1.0), bytes=True)[..., :3]
    return np.ascontiguousarray(rgb)


def heatmap_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>_heatmap.png``; stems that occur twice (``good/000.png``, ``crack/000.png``) get their
    folder's name in front so that no file overwrites another."""
    stems = Counter(Path(p).stem for p in paths)
    out = []
    for p in paths:
        p = Path(p)
        prefix = f"{p.parent.name}_" if stems[p.stem] > 1 and p.parent.name else ""
        out.append(f"{prefix}{p.stem}_heatmap.png")
    dup = [n for n, c in Counter(out).items() if c > 1]
    if dup:
        raise InsightADError(f"--heatmap: two images would both write {dup[0]} (same name in folders of the same name)")
    return out


def write_heatmaps(paths: Sequence[Path], maps: Sequence[np.ndarray | None], threshold: float | None,
                   out_dir: str | Path) -> list[Path | None]:
    """Write one PNG per map (atomically) at the image's own resolution; returns the paths written."""
    from insightad.model_file import atomic_write

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InsightADError(f"{out_dir}: --heatmap expects a folder, and this is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    for name, m in zip(heatmap_names(paths), maps):
        if m is None:
            written.append(None)
            continue
        target = out_dir / name
        img = Image.fromarray(heatmap_rgb(m, threshold))
        atomic_write(target, lambda tmp, img=img: img.save(tmp, format="PNG"))
        written.append(target)
    return written
