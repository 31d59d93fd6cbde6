"""Nearest-neighbour search: exact in chunks (pure torch, memory bounded by the chunk, not the query
count; what an exported graph does), or approximate through a faiss HNSW graph (the fast extra)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from insightad.errors import InsightADError

CHUNK_ELEMENTS = 1 << 22  # query rows x bank rows per distance block (16 MiB of float32)


def squared_distances(q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) squared Euclidean distances, clamped at 0: |q|^2 - 2 q.b + |b|^2 as one matrix product."""
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    d2 = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, alpha=-2.0)
    d2 += (q * q).sum(1, keepdim=True)
    return d2.clamp_min_(0.0)


def bank_norms(bank: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
    """|b|^2 per bank row; banned rows at infinity so no minimum ever picks them."""
    bank_sq = (bank * bank).sum(1)
    return bank_sq if banned is None else bank_sq.masked_fill(banned, float("inf"))


def nearest(q: torch.Tensor, bank: torch.Tensor, banned: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest bank row for each query row; ``banned`` (K,) bool rows
    are never returned (used to score a training image against the bank without its own patches)."""
    bank_sq = bank_norms(bank, banned)
    step = max(1, CHUNK_ELEMENTS // max(1, bank.shape[0]))
    dist, idx = [], []
    for a in range(0, q.shape[0], step):
        v, i = squared_distances(q[a:a + step], bank, bank_sq).min(1)
        dist.append(v.sqrt())
        idx.append(i)
    return torch.cat(dist), torch.cat(idx)


def nearest_per_image(p: torch.Tensor, bank: torch.Tensor, banned: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest`` for (B, P, D) patches, chunked along the patches of each image: the chunk count
    depends only on P (fixed by the model's input size), so the traced graph keeps a dynamic batch."""
    bank_sq = bank_norms(bank, banned)
    step = max(1, CHUNK_ELEMENTS // max(1, bank.shape[0]))
    dist, idx = [], []
    for a in range(0, p.shape[1], step):
        q = p[:, a:a + step]
        d2 = (q * q).sum(2, keepdim=True) - 2.0 * torch.matmul(q, bank.T) + bank_sq
        v, i = d2.clamp_min(0.0).min(2)
        dist.append(v.sqrt())
        idx.append(i)
    return torch.cat(dist, 1), torch.cat(idx, 1)


# ------------------------------------------------------------------------------ approximate (faiss)
SEARCHES = ("auto", "hnsw", "exact")
HNSW_M = 32  # graph degree: recall and memory grow with it
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 32  # candidates kept per query: recall@1 0.998 on bottle's patches, 7 ms per image (64: 0.999,
# 11 ms; 16: 0.995, 5 ms; benchmarks/patchcore_search.py)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_search(search: str) -> str:
    """auto -> hnsw when faiss is installed, else exact; hnsw without faiss is refused by name."""
    if search == "auto":
        return "hnsw" if faiss_available() else "exact"
    if search == "hnsw" and not faiss_available():
        raise InsightADError("search: hnsw needs faiss-cpu, which is not installed "
                             "(pip install 'insightad[fast]', or use --search exact)")
    if search not in SEARCHES:
        raise InsightADError(f"search: expected one of {', '.join(SEARCHES)}, got {search!r}")
    return search


class HnswIndex:
    """An HNSW graph over the bank rows (built once; searching costs ~log K per query, not K)."""

    def __init__(self, bank: torch.Tensor, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                 ef_search: int = HNSW_EF_SEARCH) -> None:
        import faiss

        data = np.ascontiguousarray(bank.detach().cpu().float().numpy())
        self.index = faiss.IndexHNSWFlat(data.shape[1], m)
        self.index.hnsw.efConstruction = ef_construction
        self.index.hnsw.efSearch = ef_search
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a parallel build links nodes in a racy order: one graph per bank
        try:
            self.index.add(data)
        finally:
            faiss.omp_set_num_threads(threads)

    def search(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) queries -> (distance (M,), index (M,)) of each one's (approximately) nearest bank row."""
        d2, idx = self.index.search(np.ascontiguousarray(q.detach().cpu().float().numpy()), 1)
        dist = torch.from_numpy(np.sqrt(np.maximum(d2[:, 0], 0.0))).to(q.device)
        return dist, torch.from_numpy(idx[:, 0]).to(q.device)


def exact_maxima(p: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, bank: torch.Tensor, step: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate nearest distances (B, P) of patches ``p`` (B, P, D) -> the same with each image's largest
    distance (and every one checked on the way) made exact.

    An approximate search returns a real bank row, so its distance is an upper bound of the true one, and
    a rare miss can land far away: the image score (the largest patch distance) would be that miss. So
    the patches are checked exactly in decreasing order of their approximate distance, ``step`` at a time,
    until the largest exact distance found is at least the next unchecked upper bound: then no unchecked
    patch can exceed it, and the maximum (and its nearest bank row) is the exact search's."""
    approx = dist
    dist, idx = dist.clone(), idx.clone()
    order = approx.argsort(dim=1, descending=True)
    bank_sq = bank_norms(bank)
    b, n = approx.shape
    # First round for every image in one product: usually enough (the misses are rare).
    first = order[:, :step]
    rows = torch.arange(b, device=p.device).unsqueeze(1).expand_as(first)
    v, i = squared_distances(p[rows, first].flatten(0, 1), bank, bank_sq).min(1)
    dist[rows, first], idx[rows, first] = v.sqrt().view_as(first), i.view_as(first)
    for r in range(b):
        done, best = first.shape[1], float(dist[r, first[r]].max())
        while done < n and best < float(approx[r, order[r, done]]):
            take = order[r, done:done + step]
            v, i = squared_distances(p[r, take], bank, bank_sq).min(1)
            dist[r, take], idx[r, take] = v.sqrt(), i
            best = max(best, float(dist[r, take].max()))
            done += len(take)
    return dist, idx
