"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling), vectorised for the CPU.

Each step adds the point farthest from the points chosen so far, which keeps the largest
distance from any point to the coreset within twice the optimum. Distances are computed on a
random projection of the features (``random_projection``): one matrix-vector product and an
in-place minimum per step over float32 rows, so the cost is N * projection_dim per step and the
memory N * (projection_dim + 1) floats.
"""

from __future__ import annotations

import math

import torch


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """A (dim_in, dim_out) Gaussian matrix scaled by 1/sqrt(dim_out) (Johnson-Lindenstrauss)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g) / math.sqrt(dim_out)


def coreset_size(n: int, ratio: float) -> int:
    """Number of points kept for a ratio in (0, 1]: at least one, at most n."""
    return max(1, min(n, int(math.ceil(n * ratio))))


def greedy_coreset(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices (k,) of a greedy k-center coreset of the rows of ``x`` (N, d), in selection order.

    Starts from a random row (``seed``); exact k-center greedy on ``x`` as given (project first
    for speed). Ties in the farthest distance go to the lowest index.
    """
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    x = x.float().contiguous()
    sq = (x * x).sum(1)
    nearest = torch.full((n,), float("inf"))
    chosen = torch.empty(k, dtype=torch.long)
    d2 = torch.empty(n)
    g = torch.Generator().manual_seed(seed)
    idx = int(torch.randint(n, (1,), generator=g))
    for step in range(k):
        chosen[step] = idx
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one matrix-vector product
        torch.addmv(sq, x, x[idx], alpha=-2.0, out=d2)
        d2 += sq[idx]
        torch.minimum(nearest, d2, out=nearest)
        nearest[idx] = -1.0  # chosen points are never picked again, even if rounding left them > 0
        idx = int(torch.argmax(nearest))
    return chosen
