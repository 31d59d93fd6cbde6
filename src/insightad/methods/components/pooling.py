"""Pooling of backbone levels into embeddings: one per image (baseline, Deep SVDD), or one per region of a
grid over the image (the baseline's ``grid``).

Each level contributes per-channel statistics (the mean; the spatial spread; the spatial maximum), each
L2-normalised so that every level and statistic weighs the same. The mean alone dilutes a thin, local
defect (a crack covers a few percent of the image); the spread and the maximum keep it visible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STATISTICS: dict[str, tuple[str, ...]] = {"mean": ("mean",), "mean_std": ("mean", "std"),
                                          "mean_std_max": ("mean", "std", "max")}
POOLINGS = tuple(STATISTICS)
REGION_TOP_HELP = ("with a grid: the image score is the mean of its this many farthest regions (1: the farthest; more "
                   "follows a defect that crosses several regions, such as a crack, and dilutes one that fills a "
                   "single region)")


# A region whose spread is below this fraction of its features' size is flat (a saturated or uniform area): its
# spread is float rounding, not content. L2-normalised, rounding would become a unit vector pointing wherever it
# happened to point, and engines that round differently (the Python resize and ONNX Runtime's give 255 and
# 254.9997 on a white area) would score the same image differently (2-3% on half-saturated photos). Rounding
# measures about 2e-6; one pixel one level off in a flat region of a 64 px model, 8e-4; real regions, 0.02 and more.
SPREAD_FLOOR = 1e-4


def _has_spread(flat: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """1 where a region's spread (``std`` (..., C) of ``flat`` (..., C, P)) is content, 0 where it is rounding:
    its norm at most ``SPREAD_FLOOR`` times the norm of the per-channel root mean squares."""
    size = flat.square().mean(-1).sum(-1, keepdim=True)
    return (std.square().sum(-1, keepdim=True) > (SPREAD_FLOOR * SPREAD_FLOOR) * size).to(std.dtype)


def _statistic(flat: torch.Tensor, name: str) -> torch.Tensor:
    """One per-channel statistic over the last (spatial) axis of ``flat`` (..., C, P)."""
    if name == "mean":
        return flat.mean(-1)
    if name == "std":  # two passes, never a negative variance (its exported form took sqrt(E[x^2] - E[x]^2):
        # NaN where a region is one cell)
        std = (flat - flat.mean(-1, keepdim=True)).square().mean(-1).sqrt()
        return std * _has_spread(flat, std)
    return flat.amax(-1)


def pool_flat(flats: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Levels as (..., C, P) (P: spatial positions) -> (..., D): the statistics of ``kind`` per level, each
    L2-normalised over its channels, concatenated level by level."""
    return torch.cat([F.normalize(_statistic(x, s), dim=-1) for x in flats for s in STATISTICS[kind]], dim=-1)


def pool(feats: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Backbone levels (B, C, H, W) -> one embedding per image (B, D) with the named pooling."""
    return pool_flat([f.flatten(2).float() for f in feats], kind)


def _regions_flat(f: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C, P): the cells of each region, regions row by row. Where ``grid`` does
    not divide a side, every cell is first repeated k times along it (nearest upsampling, k = the smallest
    that makes the side a multiple of ``grid``), so that a region holds each cell in proportion to how much of
    it lies inside: the same part of the image at every level, and one reshape (a few graph nodes) instead
    of a slice per region."""
    _, _, h, w = f.shape
    kh, kw = grid // math.gcd(int(h), grid), grid // math.gcd(int(w), grid)
    if kh > 1 or kw > 1:
        f = F.interpolate(f, size=(int(h) * kh, int(w) * kw), mode="nearest")
    b, c, h, w = f.shape
    x = f.float().reshape(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, grid * grid, c, (h // grid) * (w // grid))


def region_coverage(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Masks (N, H, W) -> the fraction of each region of a ``grid`` x ``grid`` split they cover (N, grid*grid), the
    regions cut as ``pool_regions`` cuts a level."""
    return _regions_flat(masks.float().unsqueeze(1), grid).mean((-1, -2))


def pool_regions(feats: list[torch.Tensor], kind: str, grid: int) -> torch.Tensor:
    """Backbone levels -> one embedding per region of a ``grid`` x ``grid`` split of the image (B, grid*grid, D),
    regions row by row; each level is split on its own cells, so a region covers the same part of the
    image at every level. ``grid`` 1: the whole image, as ``pool``."""
    if grid == 1:
        return pool(feats, kind).unsqueeze(1)
    return pool_flat([_regions_flat(f, grid) for f in feats], kind)


def farthest_regions(values: torch.Tensor, top: int = 1) -> torch.Tensor:
    """Per-region values (B, R, ...) -> per image (B, ...): the largest over the regions, or the mean of the
    ``top`` largest (at most R). An image's score from its regions: a defect that crosses several regions
    (a crack) raises several, a pore or stain in a normal image one."""
    if top <= 1:
        return values.amax(1)
    return values.topk(min(top, values.shape[1]), dim=1).values.mean(1)
