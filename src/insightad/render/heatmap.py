"""Anomaly maps as colour PNG images: one ``<stem>_heatmap.png`` per image (named as overlays are:
``render.names``), pixel-aligned with it, in the one colour convention (``render.colormap``), so colours
mean the same in every image. The scale (level, spread) is written into each PNG's text chunks for anyone
who reads values back."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from insightad.errors import InsightADError
from insightad.render.colormap import MapScale, colorize
from insightad.render.names import output_names


def write_heatmaps(paths: Sequence[Path], maps: Sequence[np.ndarray | None], scale: MapScale,
                   out_dir: str | Path) -> list[Path | None]:
    """Write one PNG per map (atomically) at the image's own resolution; returns the paths written."""
    from insightad.io import atomic_write

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InsightADError(f"{out_dir}: --heatmap expects a folder, and this is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    for name, m in zip(output_names(paths, "heatmap"), maps):
        if m is None:
            written.append(None)
            continue
        target = out_dir / name
        img = Image.fromarray(colorize(m, scale))
        atomic_write(target, partial(img.save, format="PNG", pnginfo=scale.png_info()))
        written.append(target)
    return written
