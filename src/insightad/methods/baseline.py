"""Baseline (the first seed's simple_detection): frozen ImageNet features pooled per image, or per region
of a grid over the image, distance to the normal training set (k nearest neighbours, or a shrunk-covariance
Gaussian); with a grid the image score is the mean of its ``region_top`` (2) farthest regions' distances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize
from insightad.config import DetectorParams, TileParams, param, params
from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.methods.components.knn import squared_distances
from insightad.methods.components.pooling import POOLINGS, REGION_TOP_HELP, farthest_regions, pool_regions
from insightad.methods.registry import register_method
from insightad.runtime import resolve_device


@params
class BaselineParams(TileParams, DetectorParams):
    """Frozen ImageNet features pooled per image, distance to the normal training set."""

    layers: list[int] = param([1, 2, 3], "backbone feature levels to pool (0 = finest); finer levels see "
                              "thin, local defects")
    pooling: str = param("mean_std_max", "per-channel statistics of each level: mean, mean_std, or "
                         "mean_std_max (the spread and maximum keep a small defect visible)",
                         choices=tuple(POOLINGS))
    grid: int = param(8, "regions per side: the image is split into grid x grid regions, each pooled on its own "
                      "and scored by one model of normal regions shared by all of them, and the image score is "
                      "the mean of its farthest regions' (--region-top; a defect fills more of a region than of "
                      "the image); 1: the whole image", minimum=1, maximum=32)
    region_top: int = param(2, REGION_TOP_HELP, minimum=1)
    scorer: str = param("gaussian", "gaussian: Mahalanobis distance with a shrunk covariance; knn: mean "
                        "distance to the k nearest normal regions (images, with grid 1)", choices=("knn", "gaussian"))
    k: int = param(3, "neighbours for the knn scorer", minimum=1)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of leave-one-out "
                                        "training scores", minimum=0.0, maximum=100.0)

def knn_distance(x: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance of each row of x to its k nearest rows of bank (no Python loop over
    rows, so the graph exports with a dynamic batch)."""
    return torch.topk(squared_distances(x, bank), k, dim=1, largest=False).values.sqrt().mean(1)


def image_knn(e: torch.Tensor, bank: torch.Tensor, k: int, top: int = 1) -> torch.Tensor:
    """Region embeddings (B, R, D) -> image scores (B,): the regions' ``knn_distance`` to the bank's rows (regions
    of normal images), the largest (or the mean of the ``top`` largest)."""
    return farthest_regions(knn_distance(e.flatten(0, 1), bank, k).reshape(e.shape[0], e.shape[1]), top)


def image_mahalanobis(e: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, top: int = 1) -> torch.Tensor:
    """Region embeddings (B, R, D) -> image scores (B,): the regions' Mahalanobis distances, the largest (or the
    mean of the ``top`` largest)."""
    d = e - mean
    return farthest_regions(((d @ precision) * d).sum(-1).clamp_min(0.0).sqrt(), top)


def fit_gaussian(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision with Ledoit-Wolf shrinkage: stable even with fewer images than dimensions."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(emb.flatten(0, -2).double().numpy())  # regions of every image, (N, R, D) or (N, D)
    return torch.from_numpy(lw.location_).float(), torch.from_numpy(lw.precision_).float()


class BaselineModel(nn.Module):
    """uint8 images -> (image scores,): pooled features per region (the whole image: one region), then kNN or
    Mahalanobis distance of each region, the image's score the largest (the mean of the ``top`` largest). ``bank``:
    normal regions for kNN (no rows for the Gaussian scorer, which needs only ``mean`` and ``precision``)."""

    bank: torch.Tensor
    mean: torch.Tensor
    precision: torch.Tensor

    def __init__(self, normalize: Normalize, extractor: FeatureExtractor, scorer: str, k: int,
                 bank: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, pooling: str = "mean",
                 grid: int = 1, top: int = 1) -> None:
        super().__init__()
        if bank.dim() != 2 or mean.shape != (bank.shape[1],) or (scorer == "gaussian" and precision.shape != (
                bank.shape[1], bank.shape[1])):
            raise InsightADError(f"tensors of mismatched shapes: bank {tuple(bank.shape)}, mean {tuple(mean.shape)}, "
                                 f"precision {tuple(precision.shape)}")
        self.normalize, self.extractor, self.scorer, self.k = normalize, extractor, scorer, k
        self.pooling, self.grid, self.top = pooling, int(grid), int(top)
        self.register_buffer("bank", bank)
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> region embeddings (B, grid*grid, D)."""
        return pool_regions(self.extractor(self.normalize(x)), self.pooling, self.grid)

    def score_embeddings(self, e: torch.Tensor) -> torch.Tensor:
        if self.scorer == "knn":
            return image_knn(e, self.bank, min(self.k, self.bank.shape[0]), self.top)
        return image_mahalanobis(e, self.mean, self.precision, self.top)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.score_embeddings(self.embed(x)),)


@register_method("baseline")
class BaselineDetector(BaselineParams, Detector):
    """Image-level detector; default threshold = a high percentile of leave-one-out training scores."""

    Params = BaselineParams
    tileable = True
    # Settings a model file written before they existed was fitted with (model_file fills them in).
    legacy_params: ClassVar[dict[str, Any]] = {"pooling": "mean", "grid": 1, "region_top": 1}

    sharded_fit = True

    def _embeddings(self, extractor: FeatureExtractor, images: Sequence, progress: bool) -> torch.Tensor:
        """Region embeddings (N, grid*grid, D) of images."""
        features = self._feature_runner(extractor)
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(images, progress, "baseline: features"):
                chunks.append(pool_regions(features(batch.images), self.pooling, self.grid).cpu())
        return torch.cat(chunks).float()

    def shard_embeddings(self, images: Sequence, progress: bool = False) -> torch.Tensor:
        """Pooled features of a shard of training images (run on a worker; see ``_fit_sharded``)."""
        self.device_ = resolve_device(self.device)
        return self._embeddings(self._make_extractor(), list(images), progress)

    def _fit(self, images: Sequence, progress: bool) -> None:
        extractor = self._make_extractor()
        self._finish(extractor, self._embeddings(extractor, images, progress))

    def _fit_sharded(self, images: Sequence, progress: bool, shards) -> None:
        """Features per shard, gathered here in order; the bank, Gaussian and threshold as in ``_fit``."""
        extractor = self._make_extractor()
        self._finish(extractor, torch.cat([e.float() for e in shards("shard_embeddings", list(images))]))

    def _finish(self, extractor: FeatureExtractor, emb: torch.Tensor) -> None:
        mean, precision = self._gaussian(emb)
        norm = self._normalize()
        bank = emb.flatten(0, 1) if self.scorer == "knn" else emb.new_zeros(0, emb.shape[-1])
        self.model_ = BaselineModel(norm, extractor, self.scorer, self.k, bank, mean, precision,
                                    self.pooling, self.grid, self.region_top).to(self.device_)
        loo = self._leave_one_out(emb, mean, precision)
        self.decision_scores_, self.decision_source_ = loo.numpy(), "train_loo"

    def _gaussian(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scorer != "gaussian":
            return torch.zeros(emb.shape[-1]), torch.zeros(1, 1)
        return fit_gaussian(emb)

    def _leave_one_out(self, emb: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        """Each training image scored by a model that did not see it: an honest estimate of normal scores.

        kNN on whole images: exact leave-one-out. Otherwise out-of-fold scores (5 folds): refitting the
        covariance without each image in turn costs more and says nothing more, and an image's regions
        must all leave the bank together.
        """
        n = emb.shape[0]
        if n < 2:
            return torch.zeros(n)
        if self.scorer == "knn" and emb.shape[1] == 1:
            k = min(self.k, n - 1)
            return knn_distance(emb[:, 0], emb[:, 0], k + 1) * (k + 1) / k  # the nearest is the image itself, at 0
        out = torch.zeros(n)
        folds = torch.arange(n) % min(5, n)
        for f in folds.unique():
            rest, held = emb[folds != f], emb[folds == f]
            if self.scorer == "knn":
                out[folds == f] = image_knn(held, rest.flatten(0, 1), min(self.k, rest.shape[0] * rest.shape[1]),
                                            self.region_top)
            else:
                out[folds == f] = image_mahalanobis(held, *fit_gaussian(rest), self.region_top)
        return out

    def state_metadata(self) -> dict[str, Any]:
        return {"embedding_dim": int(self._model_as(BaselineModel).bank.shape[1])}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        extractor = self._make_extractor(pretrained=False)
        return BaselineModel(self._normalize(), extractor, self.scorer, self.k,
                             torch.empty_like(tensors["bank"]), torch.empty_like(tensors["mean"]),
                             torch.empty_like(tensors["precision"]), self.pooling, self.grid, self.region_top)
