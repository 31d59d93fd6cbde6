"""Pieces the patch-level methods share: aligning feature levels, and smoothing/resizing anomaly maps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def concat_levels(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several levels -> one (B, sum C, h, w) map at the finest level's size (bilinear)."""
    h, w = feats[0].shape[-2:]
    out = [feats[0]]
    for f in feats[1:]:
        out.append(F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
                   if f.shape[-2:] != (h, w) else f)
    return torch.cat(out, dim=1)


def top_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Image scores (B,) from maps (B, ...): the mean of each map's ``fraction`` highest values (at least one);
    0 gives the maximum, 1 the mean. A thin defect that runs across the image (a crack) raises many pixels a
    little, a normal pore few pixels a lot: averaging the top of the map tells them apart where the maximum
    cannot."""
    flat = maps.flatten(1)
    size = math.prod(int(v) for v in maps.shape[1:])  # plain ints: a fixed k in an exported graph
    k = max(1, int(round(float(fraction) * size)))
    if k == 1:
        return flat.amax(dim=1)
    if k >= size:
        return flat.mean(dim=1)
    return flat.topk(k, dim=1, sorted=False).values.mean(dim=1)


def feature_grid(extractor: nn.Module, image_size: int, channels: int = 3) -> tuple[int, int]:
    """(h, w) of the finest requested level for a square input of ``image_size``."""
    with torch.inference_mode():
        out = extractor(torch.zeros(1, channels, image_size, image_size))
    return tuple(out[0].shape[-2:])


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel reaching 4 sigma each side (empty for sigma <= 0)."""
    if sigma <= 0:
        return torch.ones(1)
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class MapSmoother(nn.Module):
    """(B, h, w) patch scores -> (B, H, W) at model size: separable Gaussian blur at the working
    resolution (sigma given in input pixels, scaled to it), then bilinear upsampling.

    Blurring before upsampling costs (H/h)^2 times less than blurring at model size and gives the
    same map up to interpolation error: a Gaussian of sigma s at size H is one of s*h/H at size h.
    """

    kernel_h: torch.Tensor
    kernel_v: torch.Tensor

    def __init__(self, sigma: float, image_size: int, work_size: int) -> None:
        super().__init__()
        self.image_size = int(image_size)
        k = gaussian_kernel(sigma * work_size / image_size)
        self.radius = (k.numel() - 1) // 2
        self.register_buffer("kernel_h", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", k.view(1, 1, -1, 1), persistent=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        x = m.unsqueeze(1)
        r = self.radius
        if r > 0:
            # Reflect padding needs the pad to be smaller than the map; replicate works for any size.
            mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), self.kernel_h)
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), self.kernel_v)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x[:, 0]
