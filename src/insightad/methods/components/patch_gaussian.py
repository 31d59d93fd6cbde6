"""Streaming mean and covariance per patch position (PaDiM's statistics), memory independent of N.

Running sums of the features and of their outer products, per position, updated batch by batch
with one batched matrix product. The sums are taken around a shift (the first batch's mean per
position) so that float32 accumulation does not lose the covariance to cancellation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from insightad.errors import InsightADError

# Positions whose d x d matrices are formed at once (updating, inverting, cross-fitting): 64 x 120 x 120 float64
# is 7.4 MB per temporary. 512 made cross-fitting bottle 13-19% slower (the temporaries leave the caches) and its
# peak about 130 MB higher; 64 instead of 128: PaDiM's train on bottle about 30 MB lower, no slower.
CHUNK = 64


def lower_triangular_inverse(chol: torch.Tensor, leaf: int = 1) -> torch.Tensor:
    """Inverse of a batch of lower-triangular matrices (..., n, n) by recursive 2x2 blocks:
    [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]. Almost all work is batched matrix
    products, several times faster on the CPU than batched triangular solves of small matrices."""
    n = chol.shape[-1]
    if n == 1:
        return 1.0 / chol
    if n <= leaf:
        eye = torch.eye(n, dtype=chol.dtype, device=chol.device).expand_as(chol)
        return torch.linalg.solve_triangular(chol, eye, upper=False)
    h = n // 2
    a_inv = lower_triangular_inverse(chol[..., :h, :h], leaf)
    d_inv = lower_triangular_inverse(chol[..., h:, h:], leaf)
    out = torch.zeros_like(chol)
    out[..., :h, :h] = a_inv
    out[..., h:, h:] = d_inv
    out[..., h:, :h] = -(d_inv @ chol[..., h:, :h] @ a_inv)
    return out


def _spread(m: float, c: float) -> float:
    """Hotelling's T^2: a new point's expected squared Mahalanobis distance under the sample covariance of
    m points is proportional to (m-1)(m+1) / (m(m-c)), with c = d+2 for a plain covariance in d dimensions."""
    return (m - 1) * (m + 1) / (m * (m - c))


def sample_size_factor(n_target: int, n_fitted: int, c: float) -> float:
    """How much smaller a new image's Mahalanobis distance is, on average, under a covariance estimated
    from ``n_target`` images than under one from ``n_fitted`` (``_spread``, with ``c`` = dimensions + 2
    for a plain covariance, or the effective value ``effective_dimension`` measures for a shrunk one).
    Out-of-fold models see fewer images than the final model, so their distances run larger; the factor
    puts them on the final model's scale. 1.0 where the formula does not apply (m <= c)."""
    if c <= 0 or min(n_target, n_fitted) <= c:
        return 1.0
    return math.sqrt(_spread(n_target, c) / _spread(n_fitted, c))


def effective_dimension(ratio: float, m_fewer: float, m_more: float) -> float:
    """The c of ``_spread`` that makes new points' mean squared distance ``ratio`` times larger under a
    model fitted on ``m_fewer`` images than under one fitted on ``m_more`` (measured on the same points).

    Shrinkage towards the mean covariance over positions makes the small-sample growth of the distances
    far smaller than Hotelling's d+2 predicts (concrete, d=120, shrinkage 0.1: c about 72, not 122; with
    d+2 the out-of-fold threshold let 30-48% of new normals through where 2% was expected), so the growth
    is measured on the data instead (``PatchGaussianAccumulator.growth``). 0 when there is none."""
    if ratio <= 1.0 or m_fewer >= m_more:
        return 0.0
    # ratio = g (m_more - c) / (m_fewer - c), with g the ratio of the (m-1)(m+1)/m parts
    g = ((m_fewer - 1) * (m_fewer + 1) / m_fewer) / ((m_more - 1) * (m_more + 1) / m_more)
    c = (g * m_more - ratio * m_fewer) / (g - ratio)
    return float(min(max(c, 0.0), m_fewer - 1))


def half_fold_dimension(n: int, fold: torch.Tensor, rescore: Callable[[slice], torch.Tensor]) -> float:
    """``effective_dimension`` from one fold of the ``n`` images: ``fold`` holds the fold's own images' distances
    (first rows) under the model without the fold; ``rescore(half)`` gives that half of the fold's distances
    under the model without only that half (half a fold more images). 0 for a fold of fewer than two images
    (nothing is rescored then)."""
    n_out = int(fold.shape[0])
    if n_out < 2 or n - n_out < 2:
        return 0.0
    h = n_out // 2
    more = torch.cat([rescore(slice(0, h)), rescore(slice(h, n_out))]).double().square().mean()
    return effective_dimension(float(fold.double().square().mean() / more), n - n_out, n - n_out / 2)


class PatchGaussianAccumulator:
    """Sums for P positions of d features; ``update`` with (B, P, d), ``finalize`` for (mean, L^-1)."""

    def __init__(self, positions: int, dim: int) -> None:
        self.positions, self.dim = int(positions), int(dim)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(self.positions, self.dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.positions, self.dim, self.dim, dtype=torch.float32)

    def update(self, z: torch.Tensor) -> None:
        """Add a batch of features (B, P, d)."""
        if z.shape[1:] != (self.positions, self.dim):
            raise ValueError(f"expected (B, {self.positions}, {self.dim}) features, got {tuple(z.shape)}")
        if z.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = z.float().mean(0)
        for a in range(0, self.positions, CHUNK):  # a chunk of positions at a time: no copy of the whole batch
            y = (z[:, a:a + CHUNK].float() - self.shift[a:a + CHUNK]).transpose(0, 1)  # (P', B, d)
            self.sum[a:a + CHUNK] += y.sum(1, dtype=torch.float64)
            self.sum_outer[a:a + CHUNK].baddbmm_(y.transpose(1, 2), y)
        self.n += z.shape[0]

    def state(self) -> dict[str, torch.Tensor | int | None]:
        """The partial sums (for adding up shards accumulated elsewhere with :meth:`merge`)."""
        return {"n": self.n, "shift": self.shift, "sum": self.sum, "sum_outer": self.sum_outer}

    def merge(self, other: dict[str, torch.Tensor | int | None]) -> None:
        """Add another accumulator's :meth:`state`, re-centred on this one's shift: with d = s' - s,
        sum(z - s) = S1' + n' d and sum((z - s)(z - s)^T) = S2' + S1' d^T + d S1'^T + n' d d^T."""
        count = other["n"]
        if count is None:
            raise InsightADError("patch statistics: the state to merge has no image count 'n'")
        n = int(count)
        if n == 0:
            return
        s1, s2, shift = other["sum"], other["sum_outer"], other["shift"]
        if not (isinstance(s1, torch.Tensor) and isinstance(s2, torch.Tensor) and isinstance(shift, torch.Tensor)):
            raise InsightADError("patch statistics: the state to merge lacks its sums or shift (tensors expected)")
        if self.shift is None:
            self.shift = shift.float().clone()
            self.sum += s1.double()
            self.sum_outer += s2.float()
        else:
            d = (shift.double() - self.shift.double())  # (P, d)
            s1 = s1.double()
            cross = s1.unsqueeze(2) * d.unsqueeze(1)
            outer = s2.double() + cross + cross.transpose(1, 2) + n * d.unsqueeze(2) * d.unsqueeze(1)
            self.sum += s1 + n * d
            self.sum_outer += outer.float()
        self.n += n

    def mean(self) -> torch.Tensor:
        if self.n == 0 or self.shift is None:
            raise ValueError("no samples accumulated")
        return (self.shift.double() + self.sum / self.n).float()

    def covariance(self, epsilon: float, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Unbiased covariance (+ epsilon I) of positions [start, stop), float32 (P', d, d)."""
        stop = self.positions if stop is None else stop
        return _covariance(*self._sums(start, stop), self.n, epsilon)

    def _sums(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum (P', d) float64, sum of outer products (P', d, d) float32) of positions [a, b), around the shift."""
        return self.sum[a:b], self.sum_outer[a:b]

    def _outer_total(self) -> torch.Tensor:
        """The outer-product sums added over every position (d, d), float64, a chunk of positions at a time (a
        float64 sum over all of them at once would first make a float64 copy of the whole P x d x d tensor)."""
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for a in range(0, self.positions, CHUNK):
            total += self.sum_outer[a:a + CHUNK].sum(0, dtype=torch.float64)
        return total

    def pooled_covariance(self, left_out: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
        """The mean over positions of the unbiased covariances (d, d), float64, of the statistics without
        ``left_out`` (features of images that were added): the image-wide covariance shrinkage pulls to.
        Summed over positions, cov_p = (S2_p - S1_p S1_p^T / n) / (n - 1) needs only the position totals of
        the sums and the left-out features' own products, never a position's covariance."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        s2 = self._outer_total()
        s1 = self.sum.clone()
        n = self.n
        if left_out is not None and left_out.shape[0]:
            n -= left_out.shape[0]
            for a in range(0, self.positions, chunk):
                b = min(a + chunk, self.positions)
                y = left_out[:, a:b].float() - self.shift[a:b]  # (N', P', d)
                s1[a:b] -= y.sum(0, dtype=torch.float64)
                flat = y.flatten(0, 1)
                s2 -= (flat.T @ flat).double()
        return (s2 - s1.T @ s1 / n) / (max(n - 1, 1) * self.positions)

    def _sums_without(self, left_out: torch.Tensor | None, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(sum, sum of outer products, count) of positions [a, b) without the ``left_out`` features."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        s1, s2 = self._sums(a, b)
        if left_out is None or not left_out.shape[0]:
            return s1, s2, self.n
        y = (left_out[:, a:b].float() - self.shift[a:b]).transpose(0, 1)  # (P', N', d)
        return (s1 - y.sum(1, dtype=torch.float64), torch.baddbmm(s2, y.transpose(1, 2), y, alpha=-1.0),
                self.n - left_out.shape[0])

    def finalize(self, epsilon: float, chunk: int = CHUNK, shrinkage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, d), inverse Cholesky factors L^-1 (P, d, d)) with cov + eps I = L L^T, so that
        the squared Mahalanobis distance is ||L^-1 (x - mean)||^2. With ``shrinkage`` a, each position's
        covariance is (1 - a) cov + a (the mean covariance over positions) before eps I is added.

        The factors overwrite the outer-product sums chunk by chunk (no second P x d x d buffer),
        so the accumulator cannot be updated afterwards.
        """
        mean = self.mean()
        pooled = self.pooled_covariance(chunk=chunk) if shrinkage else None
        for a in range(0, self.positions, chunk):
            b = min(a + chunk, self.positions)
            self.sum_outer[a:b] = _inverse_factors(self.sum[a:b], self.sum_outer[a:b], self.n, epsilon, pooled,
                                                   shrinkage)
        inv = self.sum_outer
        del self.sum_outer  # the factors now live in ``inv``: the accumulator is spent
        return mean, inv

    def distances(self, z: torch.Tensor, epsilon: float, chunk: int = CHUNK, shrinkage: float = 0.0) -> torch.Tensor:
        """Mahalanobis distances (B, P) of features (B, P, d) under the current statistics, computed
        chunk by chunk over positions: no P x d x d inverse is kept, and accumulation can go on."""
        return self.distances_without(z[:0], epsilon, z, chunk=chunk, shrinkage=shrinkage)[0]

    def distances_without(self, left_out: torch.Tensor, epsilon: float, *queries: torch.Tensor, chunk: int = CHUNK,
                          shrinkage: float = 0.0) -> list[torch.Tensor]:
        """Mahalanobis distances (B, P) of each batch of features in ``queries`` under the statistics of every
        image added so far except ``left_out`` (features (N', P, d) of images that were added): exactly the
        model fitted without them (cross-fitting, shrinkage included), chunk by chunk over positions, so no
        second P x d x d buffer is made, the queries are never concatenated, and this accumulator is not
        changed."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        pooled = self.pooled_covariance(left_out, chunk) if shrinkage else None
        out = [torch.empty(q.shape[0], self.positions) for q in queries]
        for a in range(0, self.positions, chunk):
            b = min(a + chunk, self.positions)
            s1, s2, n = self._sums_without(left_out, a, b)
            mean = (self.shift[a:b].double() + s1 / n).float()
            factors = _inverse_factors(s1, s2, n, epsilon, pooled, shrinkage).transpose(1, 2)
            for q, o in zip(queries, out):
                if q.shape[0]:
                    w = torch.bmm((q[:, a:b].float() - mean).transpose(0, 1), factors)
                    o[:, a:b] = w.square().sum(-1).sqrt().transpose(0, 1)
        return out

    def growth(self, left_out: torch.Tensor, distances: torch.Tensor, epsilon: float,
               shrinkage: float = 0.0) -> float:
        """Effective ``c`` (``effective_dimension``) from one fold: ``distances`` are the fold's own images'
        (``left_out``) under the model without the fold; each half of the fold is scored again under the
        model without only that half (more images), and the growth of the mean squared distance between
        the two sizes gives c. 0 for a fold of fewer than two images."""
        return half_fold_dimension(self.n, distances[:left_out.shape[0]], lambda half: self.distances_without(
            left_out[half], epsilon, left_out[half], shrinkage=shrinkage)[0])


class FactorStatistics(PatchGaussianAccumulator):
    """The statistics a fitted model's factors stand for, read back from them instead of kept or recomputed.

    With cov + eps I = L L^T at every position (after shrinkage ``a`` towards the mean covariance over
    positions), L L^T - eps I averages over positions to that mean covariance, and each position's own is
    ((L L^T - eps I) - a mean) / (1 - a); around the model's mean the feature sums are zero and the
    outer-product sums (n - 1) cov. Only a chunk of positions is ever formed (float64), so what
    cross-fitting needs (``distances_without``) costs no second P x d x d buffer and no second pass of the
    backbone over the training images. Read-only: ``update``, ``merge`` and ``finalize`` refuse.
    """

    def __init__(self, mean: torch.Tensor, inv_chol: torch.Tensor, n: int, epsilon: float, shrinkage: float = 0.0,
                 chunk: int = CHUNK) -> None:
        if not 0.0 <= shrinkage < 1.0:
            raise InsightADError(f"patch statistics: shrinkage {shrinkage} hides each position's own covariance "
                                 "(expected 0 <= shrinkage < 1)")
        if n < 2 or inv_chol.shape[0] != mean.shape[0]:
            raise InsightADError(f"patch statistics: expected factors for {mean.shape[0]} positions and at least "
                                 f"2 images, got {inv_chol.shape[0]} and {n}")
        self.positions, self.dim = int(mean.shape[0]), int(mean.shape[1])
        self.n, self.epsilon, self.shrinkage = int(n), float(epsilon), float(shrinkage)
        self.inv_chol = inv_chol
        self.shift = mean.float()
        self.sum = torch.zeros(self.positions, self.dim, dtype=torch.float64)
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for a in range(0, self.positions, chunk):
            total += self._shrunk(a, min(a + chunk, self.positions)).sum(0)
        self.pooled = total / self.positions

    def _shrunk(self, a: int, b: int) -> torch.Tensor:
        """(1 - a) cov_p + a pooled of positions [a, b), float64: L L^T - eps I."""
        chol = lower_triangular_inverse(self.inv_chol[a:b].double())
        cov = chol @ chol.transpose(1, 2)
        cov.diagonal(dim1=1, dim2=2).sub_(self.epsilon)
        return cov

    def _sums(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        cov = (self._shrunk(a, b) - self.shrinkage * self.pooled) / (1.0 - self.shrinkage)
        return self.sum[a:b], (cov * (self.n - 1)).float()

    def _outer_total(self) -> torch.Tensor:
        return self.pooled * ((self.n - 1) * self.positions)

    def update(self, z: torch.Tensor) -> None:
        raise InsightADError("patch statistics read from a model's factors cannot take more images")

    def merge(self, other: dict[str, torch.Tensor | int | None]) -> None:
        raise InsightADError("patch statistics read from a model's factors cannot take more images")

    def finalize(self, epsilon: float, chunk: int = CHUNK, shrinkage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        raise InsightADError("patch statistics read from a model's factors: the model is already final")


def _covariance(s1: torch.Tensor, s2: torch.Tensor, n: int, epsilon: float, pooled: torch.Tensor | None = None,
                shrinkage: float = 0.0) -> torch.Tensor:
    """Unbiased covariance, float32 (P', d, d), from shifted sums over ``n`` images; shrunk towards ``pooled``
    by ``shrinkage`` (a: (1 - a) cov + a pooled), then epsilon I added."""
    m = (s1 / n).float()  # mean of the shifted features
    cov = s2 - n * m.unsqueeze(2) * m.unsqueeze(1)
    cov /= max(n - 1, 1)
    if shrinkage and pooled is not None:
        cov.mul_(1.0 - shrinkage).add_(shrinkage * pooled.float())
    cov.diagonal(dim1=1, dim2=2).add_(epsilon)
    return cov


def _inverse_factors(s1: torch.Tensor, s2: torch.Tensor, n: int, epsilon: float, pooled: torch.Tensor | None = None,
                     shrinkage: float = 0.0) -> torch.Tensor:
    """L^-1 with L L^T = the covariance of the sums (float64 where float32 is numerically indefinite)."""
    chol, info = torch.linalg.cholesky_ex(_covariance(s1, s2, n, epsilon, pooled, shrinkage))
    if int(info.max()) > 0:
        chol = torch.linalg.cholesky(_covariance(s1, s2, n, epsilon, pooled, shrinkage).double()).float()
    return lower_triangular_inverse(chol)
