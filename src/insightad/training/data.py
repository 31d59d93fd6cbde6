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
        out[batch.indices] = batch.images.round().clamp_(0, 255).to(torch.uint8)
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
