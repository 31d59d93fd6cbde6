"""Batches of model-ready images (float32 0..255 at model size), decoded in worker processes; bad files are reported."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from insightad.data.layouts import Sample
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError

ImageSource = Any  # str | Path | bytes | PIL.Image | np.ndarray | Sample


@dataclass
class Batch:
    """float32 images (0..255) at model size, their original (h, w), their index in the source list, errors."""

    images: torch.Tensor  # float32 (B, C, h, w) at model size (empty when ``decoded`` is given)
    sizes: list[tuple[int, int]]
    indices: list[int]
    errors: dict[int, str]  # index -> one-line message, for sources that could not be read
    decoded: list[np.ndarray] | None = None  # iter_batches(original=True): uint8 (C, H, W) at each image's own size


def source_path(src: ImageSource) -> Path | None:
    if isinstance(src, Sample):
        return src.path
    if isinstance(src, (str, Path)):
        return Path(src)
    return None


def source_name(src: ImageSource, index: int) -> str:
    p = source_path(src)
    return str(p) if p is not None else f"<image {index}>"


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, sources: Sequence[ImageSource], prep: Preprocessing, original: bool = False) -> None:
        self.sources, self.prep, self.original = sources, prep, original

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        src = self.sources[i]
        src = src.path if isinstance(src, Sample) else src
        try:
            if self.original:
                x = self.prep.decode(src)
                return x, (int(x.shape[1]), int(x.shape[2])), i, None
            x, size = self.prep.load(src)
            return x, size, i, None
        except InsightADError as e:
            return None, (0, 0), i, str(e)
        except Exception as e:  # noqa: BLE001 - a worker must report, never die, on one bad file
            return None, (0, 0), i, f"{source_name(src, i)}: cannot read image ({type(e).__name__}: {e})"


def _collate(items) -> Batch:
    ok = [it for it in items if it[3] is None]
    errors = {it[2]: it[3] for it in items if it[3] is not None}
    if ok and ok[0][0].dtype == np.uint8:  # decoded at their own sizes: the engine resizes (and stacks)
        return Batch(torch.empty(0, dtype=torch.float32), [it[1] for it in ok], [it[2] for it in ok], errors,
                     decoded=[it[0] for it in ok])
    images = torch.from_numpy(np.stack([it[0] for it in ok])) if ok else torch.empty(0, dtype=torch.float32)
    return Batch(images, [it[1] for it in ok], [it[2] for it in ok], errors)


def auto_workers(n_items: int, requested: int = -1) -> int:
    """Decode in parallel only when it pays: enough images and more than one core."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if n_items < 32 or cores < 2 else min(2, cores)


def iter_batches(sources: Sequence[ImageSource], prep: Preprocessing, batch_size: int = 16,
                 workers: int = -1, strict: bool = True, original: bool = False) -> Iterator[Batch]:
    """Yield batches in order. ``strict``: the first unreadable source raises its one-line error.
    ``original``: decoded uint8 images at their own size (for a graph that resizes them itself)."""
    if isinstance(sources, (str, Path, bytes, Image.Image, np.ndarray)):
        sources = [sources]
    n_workers = auto_workers(len(sources), workers)
    loader = torch.utils.data.DataLoader(_ImageList(list(sources), prep, original), batch_size=batch_size,
                                         num_workers=n_workers, collate_fn=_collate,
                                         persistent_workers=False,
                                         prefetch_factor=2 if n_workers else None)
    for batch in loader:
        if strict and batch.errors:
            raise InsightADError(batch.errors[min(batch.errors)])
        yield batch
