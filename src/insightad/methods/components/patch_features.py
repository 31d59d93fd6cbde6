"""Frozen multi-level patch features on one grid, standardised per channel (patch Deep SVDD, the
feature autoencoder).

Each requested backbone level is brought to the grid of ``grid_level`` (finer levels average-pooled,
coarser ones upsampled bilinearly) and the channels are concatenated; then every channel is
standardised with its mean and standard deviation over the training patches, so a head or a
reconstruction loss trained on them weighs every channel alike instead of the few with large
activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize


def align_levels(feats: Sequence[torch.Tensor], grid: int, reductions: Sequence[int]) -> torch.Tensor:
    """Feature maps of several levels -> one (B, sum C, h, w) map on the grid of level index ``grid``.

    Finer levels are average-pooled by their (integer) stride ratio, which exports to ONNX with any
    input size; whatever still differs in size (odd sides) is resized bilinearly."""
    h, w = feats[grid].shape[-2:]
    out = []
    for f, r in zip(feats, reductions):
        k = reductions[grid] // r
        if k > 1:
            f = F.avg_pool2d(f, k, stride=k, ceil_mode=True)
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


class PatchFeatures(nn.Module):
    """uint8 images -> standardised patch features (B, C, h, w); frozen, always in eval mode."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, normalize: Normalize, extractor: FeatureExtractor, grid: int, channels: int) -> None:
        super().__init__()
        self.normalize, self.extractor, self.grid = normalize, extractor, int(grid)
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def raw(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone levels -> aligned, not yet standardised, patch features."""
        return align_levels(feats, self.grid, self.extractor.reductions)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardize(self.raw(self.extractor(self.normalize(x))))

    @torch.no_grad()
    def fit_statistics(self, raw: torch.Tensor, eps: float = 1e-6) -> None:
        """Per-channel mean and standard deviation over every training patch of ``raw`` (N, C, h, w)."""
        x = raw.double()
        self.mean.copy_(x.mean(dim=(0, 2, 3), keepdim=True).float())
        self.std.copy_((x.std(dim=(0, 2, 3), keepdim=True) + eps).float())

    def train(self, mode: bool = True) -> PatchFeatures:
        return super().train(False)  # frozen: batch-norm statistics never move
