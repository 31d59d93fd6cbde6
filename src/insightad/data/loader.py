"""Batches of model-ready images, decoded in a few threads; unreadable files are reported, not fatal.

numpy only (no PyTorch): the scoring path of an exported model uses it. Pillow decodes and resizes
with the GIL released, so threads decode in parallel without the memory and start-up of processes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from insightad.data.layouts import Sample
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError

ImageSource = Any  # str | Path | bytes | PIL.Image | np.ndarray | Sample
Reader = Callable[[Any], tuple[np.ndarray, tuple[int, int]]]  # source -> (image (C, H, W), original (h, w))
Item = tuple[np.ndarray | None, tuple[int, int], int, str | None]  # (image, original (h, w), index, error)


@dataclass
class Batch:
    """Images (each (C, H, W): float32 0..255 at model size, or, ``decoded``, uint8 at its own size), their
    original (h, w), their index in the source list, and errors (index -> one-line message)."""

    images: list[np.ndarray]
    sizes: list[tuple[int, int]]
    indices: list[int]
    errors: dict[int, str]

    def stacked(self) -> np.ndarray:
        """The images as one (B, C, H, W) array (images of one size: model size, or a run of equal sizes)."""
        return np.stack(self.images)


def source_path(src: ImageSource) -> Path | None:
    if isinstance(src, Sample):
        return src.path
    if isinstance(src, (str, Path)):
        return Path(src)
    return None


def source_name(src: ImageSource, index: int) -> str:
    p = source_path(src)
    return str(p) if p is not None else f"<image {index}>"


def _read(read: Reader, src: ImageSource, i: int) -> Item:
    src = src.path if isinstance(src, Sample) else src
    try:
        x, size = read(src)
        return x, size, i, None
    except InsightADError as e:
        return None, (0, 0), i, str(e)
    except Exception as e:  # noqa: BLE001 - one bad file is reported, never fatal to the others
        return None, (0, 0), i, f"{source_name(src, i)}: cannot read image ({type(e).__name__}: {e})"


def _collate(items: list[Item]) -> Batch:
    ok = [it for it in items if it[3] is None]
    errors = {it[2]: str(it[3]) for it in items if it[3] is not None}
    return Batch([it[0] for it in ok if it[0] is not None], [it[1] for it in ok], [it[2] for it in ok], errors)


def auto_workers(n_items: int, requested: int = -1) -> int:
    """Decode in parallel only when it pays: enough images and more than one core."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if n_items < 32 or cores < 2 else min(2, cores)


def iter_batches(sources: Sequence[ImageSource], read: Preprocessing | Reader, batch_size: int = 16,
                 workers: int = -1, strict: bool = True) -> Iterator[Batch]:
    """Yield batches in order, each source read by ``read`` (a Preprocessing: its ``load``, model size),
    ``workers`` threads reading up to two batches ahead. ``strict``: the first unreadable source raises
    its one-line error."""
    if isinstance(sources, (str, Path, bytes, Image.Image, np.ndarray)):
        sources = [sources]
    sources = list(sources)
    if isinstance(read, Preprocessing):
        read = read.load
    n_workers = auto_workers(len(sources), workers)
    batch_size = max(1, int(batch_size))
    starts = range(0, len(sources), batch_size)
    if not n_workers:
        for lo in starts:
            yield _checked(_collate([_read(read, sources[i], i) for i in range(lo, min(lo + batch_size, len(sources)))]),
                           strict)
        return
    with ThreadPoolExecutor(n_workers, thread_name_prefix="insightad-decode") as pool:
        ahead: deque[list[Future[Item]]] = deque()
        todo = iter(starts)
        try:
            for _ in range(2):
                _submit(pool, ahead, todo, sources, read, batch_size)
            while ahead:
                batch = _collate([f.result() for f in ahead.popleft()])
                _submit(pool, ahead, todo, sources, read, batch_size)
                yield _checked(batch, strict)
        finally:
            for futures in ahead:
                for f in futures:
                    f.cancel()


def _submit(pool: ThreadPoolExecutor, ahead: deque, todo: Iterator[int], sources: list, read: Reader,
            batch_size: int) -> None:
    lo = next(todo, None)
    if lo is not None:
        ahead.append([pool.submit(_read, read, sources[i], i) for i in range(lo, min(lo + batch_size, len(sources)))])


def _checked(batch: Batch, strict: bool) -> Batch:
    if strict and batch.errors:
        raise InsightADError(batch.errors[min(batch.errors)])
    return batch
