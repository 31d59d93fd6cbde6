"""The augmentation hook: a named callable applied to each batch of training images.

An augmentation takes a uint8 batch (B, C, H, W) and a ``torch.Generator`` (seeded per epoch,
so a resumed run draws exactly what an uninterrupted one would) and returns a batch of the same
shape and dtype. The augmentations themselves are registered by the methods that need them;
``none`` (the default) trains on the images as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from insightad.errors import InsightADError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def no_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The default: the images unchanged."""
    return images


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
