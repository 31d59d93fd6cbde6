"""Training data held as tensors: images decoded once to uint8, and a seeded validation split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from insightad.data.loader import ImageSource, iter_batches
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError


def load_images(sources: Sequence[ImageSource], prep: Preprocessing, batch_size: int = 32, workers: int = -1,
                progress: bool = False, desc: str = "load images") -> torch.Tensor:
    """All images as one uint8 tensor (N, C, H, W) at the model size (decoded once, reused every epoch; the
    float resize is rounded to the nearest level, a quarter of the memory of floats)."""
    n = len(sources)
    out = torch.empty((n, prep.channels, *prep.size), dtype=torch.uint8)
    batches = iter_batches(sources, prep, batch_size, workers, strict=True)
    for batch in tqdm(batches, total=(n + batch_size - 1) // batch_size, desc=desc, unit="batch",
                      disable=not progress, leave=False):
        out[batch.indices] = torch.from_numpy(batch.stacked()).round().clamp_(0, 255).to(torch.uint8)
    return out


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices), drawn with ``seed``; no validation when too few images."""
    if n < 1:
        raise InsightADError("training: no images given")
    n_val = int(round(n * fraction))
    if fraction <= 0 or n_val < 1 or n - n_val < 1:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng([int(seed), 7]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def sources_digest(sources: Sequence[ImageSource]) -> str:
    """A short fingerprint of which images (by name and order) a run trains on."""
    import hashlib

    from insightad.data.loader import source_name

    h = hashlib.sha1()
    for i, s in enumerate(sources):
        h.update(source_name(s, i).encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def content_digest(sources: Sequence[ImageSource]) -> str:
    """A short fingerprint of what the images a run trains on hold (file bytes, or the pixels given in memory), in
    order: a checkpoint made on images since replaced under the same names (a camera's new captures) must not be
    resumed, and ``sources_digest`` sees names only. An unreadable file counts as empty (the loader names it)."""
    import hashlib

    from insightad.data.loader import source_path
    from insightad.io import file_sha256

    h = hashlib.sha1()
    for s in sources:
        path = source_path(s)
        if path is not None:
            try:
                h.update(file_sha256(path).encode())
            except OSError:
                pass
        elif isinstance(s, (bytes, bytearray)):
            h.update(bytes(s))
        else:  # an array or a PIL image
            arr = np.asarray(s)
            h.update(repr((arr.shape, str(arr.dtype))).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def data_fingerprint(sources: Sequence[ImageSource]) -> dict[str, str]:
    """What a checkpoint records of its training images: which (``data``) and what they held (``data_content``)."""
    return {"data": sources_digest(sources), "data_content": content_digest(sources)}
