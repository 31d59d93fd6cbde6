"""PatchCore (Roth et al. 2022): a coreset memory bank of locally aware patch features.

Two middle backbone levels are average-pooled over a small neighbourhood (so each patch feature
sees its surroundings), brought to the finer grid and concatenated. The training patches are
reduced to a greedy k-center coreset chosen on a random projection; a test patch's anomaly is
its distance to the nearest bank patch. The image score is the mean of the map's top ``score_top``
fraction (5%); with 0 it is the paper's: the largest patch distance, re-weighted by how isolated that
patch's nearest bank neighbour is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize
from insightad.config import DetectorParams, TileParams, param, params
from insightad.decide.thresholds import FitPolicy
from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.methods.components.coreset import coreset_size, greedy_coreset, random_projection
from insightad.methods.components.knn import (
    SEARCHES,
    HnswIndex,
    exact_maxima,
    nearest,
    nearest_per_image,
    resolve_search,
    squared_distances,
)
from insightad.methods.components.maps import MapSmoother, concat_levels, feature_grid, top_mean
from insightad.methods.registry import register_method
from insightad.runtime import resolve_device

if TYPE_CHECKING:
    from insightad.engines.features import FeatureFn


@params
class PatchCoreParams(TileParams, DetectorParams):
    """PatchCore: a coreset memory bank of locally aware patch features; nearest-neighbour distance maps."""

    layers: list[int] = param([2, 3], "backbone feature levels (0 = finest), upsampled to the finer "
                              "and concatenated")
    coreset_ratio: float = param(0.1, "fraction of training patches kept in the memory bank",
                                 minimum=0.0, maximum=1.0, exclusive_min=True, aliases=("--coreset",))
    projection_dim: int = param(32, "dimension of the random projection used for coreset selection "
                                "(0: the full features)", minimum=0)
    neighbourhood: int = param(3, "side of the neighbourhood averaged into each patch feature (odd)", minimum=1)
    num_neighbors: int = param(9, "bank neighbours used by the image-score re-weighting", minimum=1)
    sigma: float = param(4.0, "Gaussian smoothing of the map, in input pixels (0: none)", minimum=0.0)
    score_top: float = param(0.05, "image score: the mean of this fraction of the map's highest pixels (0: the "
                             "paper's re-weighted maximum); 5% chosen on out-of-fold synthetic defects of both "
                             "shared sets (docs/defaults.md)", minimum=0.0, maximum=1.0)
    search: str = param("auto", "nearest-neighbour search at predict time: hnsw (approximate faiss graph, "
                        "recall@1 >= 0.99, several times faster), exact, or auto (hnsw when faiss-cpu is "
                        "installed, else exact); an exported graph always searches exactly", choices=SEARCHES)
    feature_cache_mb: int = param(256, "full-size training features kept in memory up to this size; "
                                  "past it a second pass recomputes only the memory bank's", minimum=0)
    threshold_images: int = param(16, "training images scored leave-one-image-out for the default "
                                  "threshold", minimum=1)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of the leave-one-"
                                        "image-out training scores", minimum=0.0, maximum=100.0)

class PatchCoreModel(nn.Module):
    """uint8 images -> (image scores, maps at model size) against the memory bank."""

    bank: torch.Tensor

    def __init__(self, normalize: Normalize, extractor: FeatureExtractor, feature_size: tuple[int, int],
                 image_size: int, sigma: float, neighbourhood: int, num_neighbors: int, bank: torch.Tensor,
                 search: str = "exact", score_top: float = 0.0) -> None:
        super().__init__()
        self.search = resolve_search(search)
        self.score_top = float(score_top)
        self._index: tuple[tuple, HnswIndex] | None = None  # built on first use, for the bank as it is then
        # The frozen backbone on a faster engine (set by the detector for predict; not part of the model's state).
        self.features: FeatureFn | None = None
        self.features_size: tuple[int, ...] = ()
        self.normalize, self.extractor = normalize, extractor
        self.feature_size = tuple(int(v) for v in feature_size)
        self.neighbourhood, self.num_neighbors = int(neighbourhood), int(num_neighbors)
        self.smoother = MapSmoother(sigma, image_size, self.feature_size[0])
        self.register_buffer("bank", bank)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> locally aware patch features (B, P, D)."""
        if self.features is not None and tuple(x.shape[1:]) == self.features_size \
                and not torch.onnx.is_in_onnx_export():
            return self.patches_from_levels([f.to(x.device) for f in self.features(x)])
        return self.patches_from_levels(self.extractor(self.normalize(x)))

    def patches_from_levels(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels -> neighbourhood-averaged, concatenated patch features (B, P, D)."""
        k = self.neighbourhood
        if k > 1:
            feats = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in feats]
        return concat_levels(feats).flatten(2).transpose(1, 2)

    def score_patches(self, p: torch.Tensor, banned: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, D) patch features -> (image scores (B,), maps (B, H, W) at model size)."""
        b, n, _ = p.shape
        if torch.onnx.is_in_onnx_export():  # chunks per image: the graph keeps a dynamic batch
            dist, idx = nearest_per_image(p, self.bank, banned)
        elif banned is None and self.search == "hnsw" and self.bank.device.type == "cpu":
            dist, idx = self.hnsw().search(p.reshape(b * n, -1))
            dist, idx = exact_maxima(p, dist.view(b, n), idx.view(b, n), self.bank)  # the image score is exact
        else:  # flat chunks: faster and leaner in PyTorch
            dist, idx = nearest(p.reshape(b * n, -1), self.bank, banned)
            dist, idx = dist.view(b, n), idx.view(b, n)
        worst, at = dist.max(1)
        rows = torch.arange(b, device=p.device)
        m_test = p[rows, at]  # the most anomalous patch of each image
        m_star = idx[rows, at]  # its nearest bank patch
        # The bank neighbourhood of m*: itself first, then its nearest other bank patches.
        d_star = squared_distances(self.bank[m_star], self.bank)
        d_star[rows, m_star] = -1.0
        if banned is not None:
            d_star = d_star.masked_fill(banned.unsqueeze(0), float("inf"))
        k = min(self.num_neighbors, self.bank.shape[0])
        support = d_star.topk(k, dim=1, largest=False).indices  # (B, k)
        d_support = (m_test.unsqueeze(1) - self.bank[support]).norm(dim=2)  # (B, k)
        # Paper: s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)} exp|m_test - m|) * s*: a patch whose
        # nearest bank patch is itself far from other bank patches (rare in normal data) counts more.
        weight = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
        maps = self.smoother(dist.view(b, *self.feature_size))
        return (weight * worst if self.score_top == 0 else top_mean(maps, self.score_top)), maps

    def exported(self) -> PatchCoreModel:
        """This model with exact search (same tensors): what the ONNX graph computes, so what its export
        is checked against."""
        twin = copy.copy(self)
        twin.search, twin._index, twin.features = "exact", None, None
        return twin

    def hnsw(self) -> HnswIndex:
        """The approximate index of the current bank (rebuilt when the bank is replaced)."""
        key = (self.bank.data_ptr(), tuple(self.bank.shape))
        if self._index is None or self._index[0] != key:
            self._index = (key, HnswIndex(self.bank))
        return self._index[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_patches(self.patches(x))


@register_method("patchcore")
class PatchCoreDetector(PatchCoreParams, Detector):
    """PatchCore with a two-stage fit: projected features for the coreset, then the bank at full size.

    Memory: the coreset needs every training patch, but only as a ``projection_dim`` projection
    (N x projection_dim floats). Full-size features are cached during the first pass while they
    fit in ``feature_cache_mb``; past that, a second pass over the images recomputes them and keeps
    only the coreset rows, so memory grows with the bank, not with the training set at full size.

    Default threshold: ``threshold_images`` training images (at random, ``seed``) are scored
    against the bank without their own patches (leave-one-image-out) and the threshold is the
    ``threshold_percentile`` of those scores: an in-bank image would find its own patches at
    distance ~0 and give a threshold far too low.
    """

    Params = PatchCoreParams
    tileable = True
    # A model file from before --search (--score-top) existed scored with exact search (the re-weighted
    # maximum): it still does.
    legacy_params: ClassVar[dict[str, Any]] = {"search": "exact", "score_top": 0.0}
    has_maps = True
    # ONNX Runtime plans memory for every unrolled nearest-neighbour chunk at once (5 GB at a 10%
    # coreset on bottle) and runs slower than PyTorch here: --engine auto keeps PyTorch for it.
    onnx_auto = False
    sharded_fit = True

    def _fit(self, images: Sequence, progress: bool) -> None:
        if self.neighbourhood % 2 == 0:
            raise InsightADError(f"neighbourhood: expected an odd number (3, 5, ...), got {self.neighbourhood}")
        extractor = self._make_extractor().to(memory_format=torch.channels_last)
        features = self._feature_runner(extractor)  # the frozen backbone on the fast engine
        dim = sum(extractor.channels)
        size = feature_grid(extractor, self.image_size, self.preprocessing_.channels)
        n, per = len(images), size[0] * size[1]
        model = PatchCoreModel(self._normalize(), extractor, size, self.image_size, self.sigma, self.neighbourhood,
                               self.num_neighbors, torch.zeros(1, dim), self.search,
                               self.score_top).to(self.device_)
        proj = random_projection(dim, self.projection_dim, self.seed) if 0 < self.projection_dim < dim else None
        keep = n * per * dim * 4 <= self.feature_cache_mb * 2**20
        projected = torch.empty(n * per, proj.shape[1] if proj is not None else dim)
        cache = torch.empty(n * per, dim) if keep and proj is not None else None
        with torch.inference_mode():
            pos = 0
            for batch in self._batches(images, progress, "patchcore: features"):
                p = self._patches(features, model, batch.images).flatten(0, 1)
                projected[pos:pos + len(p)] = p @ proj if proj is not None else p
                if cache is not None:
                    cache[pos:pos + len(p)] = p
                pos += len(p)
            if proj is None and keep:
                cache = projected
            self._finish(model, projected, cache, images, per, lambda chosen, judge: self._second_pass(
                features, model, images, chosen, judge, per, dim, progress))

    def _finish(self, model: PatchCoreModel, projected: torch.Tensor, cache: torch.Tensor | None, images: Sequence,
                per: int, second_pass) -> None:
        """Coreset on the (projected) patches, the memory bank, the default threshold."""
        n = len(images)
        with torch.inference_mode():
            k = coreset_size(n * per, self.coreset_ratio)
            chosen = greedy_coreset(projected, k, self.seed).sort().values
            del projected
            judge = self._threshold_images(n)
            if cache is not None:
                bank = cache[chosen].clone()
                kept = {i: cache[i * per:(i + 1) * per].clone() for i in judge}
                del cache
            else:
                bank, kept = second_pass(chosen, judge)
            model.bank = bank.to(self.device_)
            self.model_ = model.eval()
            self.bank_size_ = int(k)
            # which training image each bank patch came from: out-of-fold validation scores an image against
            # the bank without its own patches (methods.crossfit); not saved in the model file
            self.bank_source_ = (chosen // per).to(torch.int32)
            self._score_normals(model, kept, images)

    # ------------------------------------------------------------------ distributed fit (features per shard)
    def _empty_model(self) -> tuple[PatchCoreModel, int]:
        extractor = self._make_extractor().to(memory_format=torch.channels_last)
        dim = sum(extractor.channels)
        size = feature_grid(extractor, self.image_size, self.preprocessing_.channels)
        model = PatchCoreModel(self._normalize(), extractor, size, self.image_size, self.sigma, self.neighbourhood,
                               self.num_neighbors, torch.zeros(1, dim), self.search,
                               self.score_top).to(self.device_)
        return model, dim

    def shard_patches(self, images: Sequence, progress: bool = False) -> torch.Tensor:
        """Patch features (n * positions, C) of a shard of training images (run on a worker)."""
        self.device_ = resolve_device(self.device)
        model, _ = self._empty_model()
        features = self._feature_runner(model.extractor)
        out = [self._patches(features, model, b.images).flatten(0, 1)
               for b in self._batches(list(images), progress, "patchcore: shard features")]
        return torch.cat(out)

    def _fit_sharded(self, images: Sequence, progress: bool, shards) -> None:
        """Features extracted on the workers and gathered here (they must fit in --feature-cache-mb);
        projection, coreset, bank and threshold as in ``_fit``."""
        model, dim = self._empty_model()
        per = model.feature_size[0] * model.feature_size[1]
        if len(images) * per * dim * 4 > self.feature_cache_mb * 2**20:
            raise InsightADError(f"patchcore --ray: the {len(images)} images' patch features "
                                 f"({len(images) * per * dim * 4 / 2**20:.0f} MB) exceed feature_cache_mb "
                                 f"({self.feature_cache_mb}); raise it or train without --ray")
        cache = torch.cat([t.float() for t in shards("shard_patches", list(images))])
        proj = random_projection(dim, self.projection_dim, self.seed) if 0 < self.projection_dim < dim else None
        self._finish(model, cache @ proj if proj is not None else cache, cache, images, per, None)

    def _patches(self, features, model: PatchCoreModel, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            feats = [f.to(self.device_) for f in features(x)]
            return model.patches_from_levels(feats).float().cpu()

    @torch.inference_mode()
    def forward_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._fast_backbone()
        return super().forward_tensor(x)

    def _fast_backbone(self) -> None:
        """Predict on the CPU runs the frozen backbone on the fit's engine (ONNX Runtime: BatchNorm folded into
        the convolutions, about 2.4x PyTorch's speed on lite0); the search stays in PyTorch or faiss, since
        the whole-model graph is not used for PatchCore (see ``onnx_auto``). Same features within 1e-6."""
        model = self._model_as(PatchCoreModel)
        if model.features is not None or getattr(self, "device_", torch.device("cpu")).type != "cpu":
            return
        model.features, _ = self._backbone_runner(model.extractor)
        p = self.preprocessing_
        model.features_size = (p.channels, *p.size)

    def _threshold_images(self, n: int) -> list[int]:
        if n < 2:
            return []
        g = torch.Generator().manual_seed(self.seed + 1)
        return sorted(torch.randperm(n, generator=g)[:min(self.threshold_images, n)].tolist())

    def _second_pass(self, features, model: PatchCoreModel, images: Sequence, chosen: torch.Tensor, judge: list[int],
                     per: int, dim: int, progress: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Recompute the features, keeping only the coreset rows and the threshold images' patches."""
        bank = torch.empty(len(chosen), dim)
        kept: dict[int, torch.Tensor] = {}
        wanted = set(judge)
        pos = 0
        for batch in self._batches(images, progress, "patchcore: memory bank"):
            p = self._patches(features, model, batch.images).flatten(0, 1)
            lo, hi = torch.searchsorted(chosen, torch.tensor([pos, pos + len(p)])).tolist()
            bank[lo:hi] = p[chosen[lo:hi] - pos]
            first = pos // per
            for j in range(len(p) // per):
                if first + j in wanted:
                    kept[first + j] = p[j * per:(j + 1) * per].clone()
            pos += len(p)
        return bank, kept

    def score_without_source(self, images: Sequence, sources: Sequence[int], features=None
                             ) -> tuple[np.ndarray, np.ndarray]:
        """(image scores, maps at model size) of ``images`` (arrays at model size) with exact search in the
        fitted bank without the patches of training image ``sources[i]`` (``bank_source_``): each image is
        scored as if that training image had never been seen."""
        model = self._model_as(PatchCoreModel)
        source = self.bank_source_.to(self.device_)
        features = features or self._feature_runner(model.extractor)
        scores, maps = [], []
        at = 0
        with torch.inference_mode():
            for batch in self._batches(list(images), False, "patchcore: validation"):
                p = self._patches(features, model, batch.images).to(self.device_)
                for j in range(p.shape[0]):
                    mask = source == int(sources[at + j])
                    # the whole bank where it has none of its patches, or nothing but them (a one-image bank:
                    # in-sample, as ``_score_normals`` falls back to)
                    banned = mask if bool(mask.any()) and not bool(mask.all()) else None
                    s, m = model.score_patches(p[j:j + 1], banned)
                    scores.append(float(s[0]))
                    maps.append(m[0].float().cpu().numpy())
                at += p.shape[0]
        return np.asarray(scores), np.stack(maps) if maps else np.empty((0, *model.feature_size))

    def _score_normals(self, model: PatchCoreModel, kept: dict[int, torch.Tensor], images: Sequence) -> None:
        source = self.bank_source_
        scores = []
        for i, p in sorted(kept.items()):
            banned = (source == i).to(self.device_)
            if bool(banned.all()):
                continue
            scores.append(float(model.score_patches(p.unsqueeze(0).to(self.device_), banned)[0]))
        if scores:
            strategy = "leave_one_image_out"
        else:  # a single training image: in-sample scores (optimistic)
            scores, strategy = list(self.predict(list(images), maps=False).scores), "train"
        self.decision_scores_, self.decision_source_ = np.asarray(scores), strategy

    def _threshold_policy(self) -> FitPolicy:
        return replace(super()._threshold_policy(), extra={"bank_size": int(self._model_as(PatchCoreModel).bank.shape[0])})

    # ------------------------------------------------------------------ persistence
    def state_metadata(self) -> dict[str, Any]:
        model = self._model_as(PatchCoreModel)
        return {"feature_size": list(model.feature_size), "bank_size": int(model.bank.shape[0])}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        extractor = self._make_extractor(pretrained=False).to(memory_format=torch.channels_last)
        return PatchCoreModel(self._normalize(), extractor, tuple(state["feature_size"]), self.image_size, self.sigma,
                              self.neighbourhood, self.num_neighbors, torch.empty_like(tensors["bank"]), self.search,
                              self.score_top)
