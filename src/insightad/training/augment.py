"""The augmentation hook: a named callable applied to each batch of training images.

An augmentation takes a uint8 batch (B, C, H, W) and a ``torch.Generator`` (seeded per epoch,
so a resumed run draws exactly what an uninterrupted one would) and returns a batch of the same
shape and dtype. The augmentations themselves are registered by the methods that need them;
``none`` (the default) trains on the images as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from insightad.errors import InsightADError

if TYPE_CHECKING:
    import PIL.Image

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
PILAugment = Callable[["PIL.Image.Image", np.random.Generator], "PIL.Image.Image"]


def no_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The default: the images unchanged."""
    return images


def per_image(fn: PILAugment) -> Augment:
    """A batch hook from a per-image PIL transform ``fn(image, rng) -> image`` (same size and mode).

    Each image gets its own numpy generator seeded from the epoch's torch generator, so the
    draws are reproducible (and a resumed run sees the same augmented images).
    """
    from PIL import Image

    def hook(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2**31 - 1, (images.shape[0],), generator=generator).tolist()
        out = torch.empty_like(images)
        for i, (x, seed) in enumerate(zip(images, seeds)):
            arr = x.permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            res = np.array(fn(img, np.random.default_rng(seed)), dtype=np.uint8)  # a writable copy
            res = res[:, :, None] if res.ndim == 2 else res
            if res.shape != arr.shape:
                raise InsightADError(f"augment: the transform changed the image shape {arr.shape} to {res.shape}")
            out[i] = torch.from_numpy(res).permute(2, 0, 1)
        return out

    return hook


_AUGMENTATIONS: dict[str, Augment] = {"none": no_augment}


def register_augmentation(name: str, fn: Augment) -> None:
    """Make ``fn`` available as ``--augment NAME``."""
    _AUGMENTATIONS[name] = fn


def available_augmentations() -> list[str]:
    return list(_AUGMENTATIONS)


def get_augmentation(name: str) -> Augment:
    if name not in _AUGMENTATIONS:
        raise InsightADError(f"augment: unknown augmentation {name!r} (available: {', '.join(_AUGMENTATIONS)})")
    return _AUGMENTATIONS[name]


def _affine(rotation: bool) -> Augment:
    """The second seed's augmentation (insightad.data.augment) as a batch hook."""
    from dataclasses import replace

    from insightad.config import AugmentParams

    params = AugmentParams() if rotation else replace(AugmentParams(), rotation=0.0)

    def one(img: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        # torchvision's transforms are imported on first use, not by every method's import
        from insightad.data.augment import apply, draw

        return apply(img, draw(params, img.size, rng), params.fill)

    return per_image(one)


register_augmentation("affine", _affine(rotation=True))
# Rotation-prediction pretraining learns from rotations: augmenting with them would blur its labels.
register_augmentation("affine-norotate", _affine(rotation=False))
