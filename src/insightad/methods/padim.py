"""PaDiM (Defard et al. 2020): one Gaussian per patch position over multi-layer CNN features.

Features of several backbone levels are brought to the finest level's grid and concatenated,
reduced to ``n_features`` channels (random selection as in the paper, or PCA), and at every patch
position the mean and covariance of the normal images are estimated in a streaming way (each
covariance shrunk by ``shrinkage`` towards their mean over positions). The anomaly map is the
Mahalanobis distance of each patch to its position's Gaussian, smoothed and upsampled; the image
score is the mean of the map's top ``score_top`` fraction (0: the paper's maximum).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize
from insightad.config import DetectorParams, TileParams, param, params
from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.methods.components.maps import MapSmoother, concat_levels, feature_grid, top_mean
from insightad.methods.components.patch_gaussian import PatchGaussianAccumulator
from insightad.methods.registry import register_method
from insightad.runtime import release_free_memory, resolve_device

if TYPE_CHECKING:
    from insightad.engines.features import FeatureFn

MAX_HELD_OUT = 64  # held-out images' features wait in memory until the statistics are complete
# Images per batch read for the statistics (FIT_BATCH) and for cross-fitting's features (EMBED_BATCH), whatever
# ``batch_size`` says: the loader reads two batches ahead, and 32 images at 256 px were ~100 MB of float images and
# their features under the factors (a fold's features too). Cross-fitting's pass over a fold: +180 MB at 8 images
# a batch, +120 MB at 2 (0.45 -> 0.6 s for 42 images); the statistics' update is slower in batches of 2.
FIT_BATCH = 8
EMBED_BATCH = 2
REDUCE_CHUNK = 8  # images whose full-width patch features (176 channels at 64x64 on lite0: 2.9 MB each) exist at once


@params
class PadimParams(TileParams, DetectorParams):
    """PaDiM: one Gaussian per patch position on multi-layer features; Mahalanobis distance maps."""

    layers: list[int] = param([1, 2, 3], "backbone feature levels (0 = finest), upsampled to the finest "
                              "and concatenated")
    n_features: int = param(120, "feature channels kept after reduction (ignored by reduction=none)", minimum=1)
    reduction: str = param("random", "channel reduction: random selection (as in the paper), pca, or none",
                           choices=("random", "pca", "none"))
    pca_images: int = param(32, "training images whose patches fit the PCA (reduction=pca)", minimum=1)
    epsilon: float = param(0.01, "diagonal regulariser added to every patch covariance", minimum=0.0,
                           exclusive_min=True)
    shrinkage: float = param(0.1, "each position's covariance is pulled this far towards the mean covariance "
                             "over positions (a steadier estimate when the images are few for the "
                             "features: 200 images for 120 features); 0: the paper's", minimum=0.0, maximum=1.0)
    score_top: float = param(0.01, "image score: the mean of this fraction of the map's highest pixels (0: the "
                             "maximum, as in the paper)", minimum=0.0, maximum=1.0)
    sigma: float = param(4.0, "Gaussian smoothing of the map, in input pixels (0: none)", minimum=0.0)
    threshold_holdout: float = param(0.1, "fraction of training images (at most 64) scored before they join the "
                                     "statistics, for the default threshold", minimum=0.0, maximum=0.5)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of the held-out "
                                        "training scores", minimum=0.0, maximum=100.0)

def level_patches(feats: list[torch.Tensor]) -> torch.Tensor:
    """Backbone levels -> concatenated features per patch position (B, P, C)."""
    return concat_levels(feats).flatten(2).transpose(1, 2)


def selected_channels(centre: torch.Tensor, projection: torch.Tensor, level_channels: Sequence[int]
                      ) -> list[torch.Tensor] | None:
    """Per level, the channels a projection keeps where it only selects them in order (random or no reduction:
    zero centre, one-hot columns in increasing channel order), else None. Upsampling is per channel, so
    selecting them before the levels are upsampled and concatenated gives ``reduce(level_patches(...))`` (up to
    float32 rounding: the upsampling kernel vectorises differently by channel count) without the full-width
    features (176 channels at 64x64 on lite0, and two copies of them in ``reduce``)."""
    idx = projection.argmax(0)
    one_hot = bool(((projection == 0) | (projection == 1)).all()) and bool((projection.sum(0) == 1).all())
    if not one_hot or bool(centre.any()) or not bool((idx.diff() > 0).all()):
        return None
    bounds = torch.tensor([0, *level_channels]).cumsum(0).tolist()
    return [idx[(idx >= lo) & (idx < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def random_projection(channels: int, dim: int, seed: int) -> torch.Tensor:
    """(C, d) one-hot columns selecting ``dim`` random channels (sorted), as in the paper."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(channels, generator=g)[:dim].sort().values
    return torch.eye(channels)[:, idx].contiguous()


def pca_projection(x: torch.Tensor, dim: int, max_rows: int = 200_000, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre (C,), components (C, d)) of the rows of ``x`` (N, C); fitted on at most ``max_rows``."""
    if x.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
    x = x.double()
    centre = x.mean(0)
    xc = x - centre
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return centre.float(), vecs[:, -dim:].flip(1).float().contiguous()


class PadimModel(nn.Module):
    """uint8 images -> (image scores, maps at model size): pure tensors, no Python state."""

    centre: torch.Tensor
    projection: torch.Tensor
    mean: torch.Tensor
    inv_chol: torch.Tensor

    def __init__(self, normalize: Normalize, extractor: FeatureExtractor, feature_size: tuple[int, int],
                 image_size: int, sigma: float, centre: torch.Tensor, projection: torch.Tensor,
                 mean: torch.Tensor, inv_chol: torch.Tensor, score_top: float = 0.0) -> None:
        super().__init__()
        self.score_top = float(score_top)
        self.normalize, self.extractor = normalize, extractor
        self.feature_size = tuple(int(v) for v in feature_size)
        self.smoother = MapSmoother(sigma, image_size, self.feature_size[0])
        self.register_buffer("centre", centre)
        self.register_buffer("projection", projection)
        self.register_buffer("mean", mean)
        self.register_buffer("inv_chol", inv_chol)

    def reduce(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, P, C) -> (B, P, d)."""
        return (raw - self.centre) @ self.projection

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each patch to its position's Gaussian: (B, P, d) -> (B, P)."""
        y = (z - self.mean).permute(1, 2, 0)  # (P, d, B)
        # L^-1 y for every patch, with the factors as they are: a transposed constant would be folded into a
        # second copy of the largest tensor when ONNX Runtime loads the graph.
        w = torch.bmm(self.inv_chol, y)
        return w.square().sum(1).sqrt().transpose(0, 1)

    def score_distances(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch distances (B, P) -> (image scores = the mean of each map's top ``score_top`` (the maximum
        by default), maps smoothed at model size)."""
        maps = self.smoother(d.reshape(d.shape[0], *self.feature_size))
        return top_mean(maps, self.score_top), maps

    def score_embeddings(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_distances(self.distances(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_levels(self.extractor(self.normalize(x)))

    def backbone(self) -> tuple[nn.Module, nn.Module]:
        """(normalize, extractor): what ``from_levels`` expects to have run."""
        return self.normalize, self.extractor

    def from_levels(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on backbone levels already computed (an ensemble runs a shared backbone once)."""
        return self.score_embeddings(self.reduce(level_patches(feats)))


@register_method("padim")
class PadimDetector(PadimParams, Detector):
    """PaDiM with a streaming fit.

    Default threshold: a ``threshold_holdout`` fraction of the training images (at most 64, chosen
    at random with ``seed``) is streamed last; each is scored by the Gaussians of all the other
    images, which never saw it, and only then added to the statistics. The threshold is the
    ``threshold_percentile`` of those honest normal scores: scoring images a model was fitted on
    would give optimistic (too low) scores and too many false alarms, while holding images out
    of the final statistics would waste training data.
    """

    Params = PadimParams
    tileable = True
    # Settings a model file written before they existed was fitted with (model_file fills them in).
    legacy_params: ClassVar[dict[str, Any]] = {"shrinkage": 0.0, "score_top": 0.0}
    has_maps = True
    sharded_fit = True

    # ------------------------------------------------------------------ fit
    def _reduced_dim(self, channels: int) -> int:
        if self.reduction == "none":
            return channels
        if self.n_features > channels:
            raise InsightADError(f"n_features: {self.n_features} exceeds the {channels} channels of layers "
                                 f"{list(self.layers)} of {self.backbone} (use at most {channels})")
        return self.n_features

    def _order(self, n: int) -> tuple[list[int], int]:
        """Image order for the stream (held-out images last) and how many come before them."""
        n_held = 0 if n < 2 or self.threshold_holdout == 0 else max(1, int(round(self.threshold_holdout * n)))
        n_held = min(n_held, MAX_HELD_OUT)
        g = torch.Generator().manual_seed(self.seed)
        held = set(torch.randperm(n, generator=g)[:n_held].tolist())
        return [i for i in range(n) if i not in held] + sorted(held), n - n_held

    def _build_model(self) -> PadimModel:
        """The model before any statistics: backbone, channel reduction (random or none), empty Gaussians."""
        extractor = self._make_extractor().to(memory_format=torch.channels_last)
        channels = sum(extractor.channels)
        dim = self._reduced_dim(channels)
        size = feature_grid(extractor, self.image_size, self.preprocessing_.channels)
        positions = size[0] * size[1]
        if self.reduction == "random":
            centre, proj = torch.zeros(channels), random_projection(channels, dim, self.seed)
        else:
            centre, proj = torch.zeros(channels), torch.eye(channels)[:, :dim].contiguous()
        # The P x d x d factors are only allocated at the end, in the accumulator's own buffer.
        return PadimModel(self._normalize(), extractor, size, self.image_size, self.sigma, centre, proj,
                          torch.zeros(positions, dim), torch.zeros(0, dim, dim), self.score_top).to(self.device_)

    def _fit(self, images: Sequence, progress: bool) -> None:
        model = self._build_model()
        positions, dim = model.mean.shape
        order, n_fit = self._order(len(images))
        acc = PatchGaussianAccumulator(positions, dim)
        held: list[torch.Tensor] = []

        def consume(z: torch.Tensor, pos: int) -> None:
            k = max(0, min(len(z), n_fit - pos))
            acc.update(z[:k])
            if k < len(z):  # held-out images: scored once every fitting image is in
                held.append(z[k:].clone())  # a copy: a view would keep the whole batch alive

        pending: list[tuple[torch.Tensor, int]] = []
        pca_ready = self.reduction != "pca"
        pos = 0
        features = self._feature_runner(model.extractor)  # the frozen backbone on the fast engine
        with torch.inference_mode():
            for batch in self._batches([images[i] for i in order], progress, "padim: statistics",
                                       batch_size=min(self.batch_size, FIT_BATCH)):
                feats = features(batch.images)
                if not pca_ready:  # the projection is fitted on the first images' full-width features
                    pending.append((level_patches(feats).cpu(), pos))
                    if pos + len(batch.images) >= min(self.pca_images, len(images)):
                        c, p = pca_projection(torch.cat([r for r, _ in pending]).flatten(0, 1), dim, seed=self.seed)
                        model.centre.copy_(c)
                        model.projection.copy_(p)
                        pca_ready = True
                        for r, at in pending:
                            consume(model.reduce(r.to(self.device_)).float().cpu(), at)
                        pending.clear()
                else:
                    consume(self._reduced(model, feats), pos)
                pos += len(batch.images)
            self._finish(model, acc, torch.cat(held) if held else torch.empty(0), images)

    def _finish(self, model: PadimModel, acc: PatchGaussianAccumulator, z_held: torch.Tensor,
                images: Sequence) -> None:
        """Score the held-out images by the Gaussians of the others, add them, invert, set the threshold."""
        scores = None
        release_free_memory()  # the statistics pass's freed batches, under the factors about to be formed
        with torch.inference_mode():
            if len(z_held):
                # Scored by the Gaussians of the other images, then added to the statistics.
                d = acc.distances(z_held, self.epsilon, shrinkage=self.shrinkage)
                scores = model.score_distances(d.to(self.device_))[0].cpu().numpy()
                acc.update(z_held)
            del z_held
            mean, inv = acc.finalize(self.epsilon, shrinkage=self.shrinkage)
            model.mean.copy_(mean)
            model.inv_chol = inv.to(self.device_)
            self.model_ = model.eval()
            strategy = "holdout"
            if scores is None:  # one image, or no hold-out asked for: in-sample scores (optimistic)
                scores, strategy = self.predict(list(images), maps=False).scores, "train"
        self.decision_scores_, self.decision_source_ = np.asarray(scores), strategy

    def embeddings(self, images: Sequence, progress: bool = False, what: str = "padim: features",
                   model: PadimModel | None = None, features: FeatureFn | None = None) -> Iterator[torch.Tensor]:
        """Reduced patch features (B, P, d) on the CPU, batch by batch, of image files or arrays at model size,
        through ``model`` (default: the fitted one) with its backbone on the fast engine (``features``: a
        runner already made, e.g. by a caller that embeds many small sets)."""
        model = model or self._model_as(PadimModel)
        features = features or self._feature_runner(model.extractor)
        with torch.inference_mode():
            for batch in self._batches(list(images), progress, what):
                yield self._reduced(model, features(batch.images))

    def embed_into(self, images: Sequence, out: torch.Tensor, what: str = "padim: features",
                   features: FeatureFn | None = None) -> int:
        """``embeddings`` written straight into ``out`` (N, P, d), batch by batch, so a caller holding many
        images' features (cross-fitting holds a fold's) never holds a batch's copy beside them; returns how
        many rows were filled (unreadable files are skipped, as by ``embeddings``)."""
        model = self._model_as(PadimModel)
        features = features or self._feature_runner(model.extractor)
        at = 0
        with torch.inference_mode():
            for batch in self._batches(list(images), False, what, batch_size=min(self.batch_size, EMBED_BATCH)):
                n = len(batch.images)
                self._reduced(model, features(batch.images), out[at:at + n])
                at += n
        return at

    def _reduced(self, model: PadimModel, feats: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone levels of a batch -> reduced patch features (B, P, d) on the CPU (into ``out`` when given),
        ``REDUCE_CHUNK`` images at a time: a whole batch's concatenated full-width features (and the copies
        reducing them makes) were the largest transient of the fit and of cross-fitting."""
        n = int(feats[0].shape[0])
        out = torch.empty(n, *model.mean.shape) if out is None else out
        kept = selected_channels(model.centre, model.projection, [int(f.shape[1]) for f in feats])
        for a in range(0, n, REDUCE_CHUNK):
            part = [f[a:a + REDUCE_CHUNK].to(self.device_) for f in feats]
            if kept is not None:  # only the kept channels are upsampled
                out[a:a + REDUCE_CHUNK] = level_patches([f.index_select(1, k) for f, k in zip(part, kept)]).float().cpu()
            else:
                out[a:a + REDUCE_CHUNK] = model.reduce(level_patches(part)).float().cpu()
        return out

    # ------------------------------------------------------------------ distributed fit (a reduction)
    def _check_shardable(self) -> None:
        if self.reduction == "pca":
            raise InsightADError("padim: reduction=pca is fitted in one process (the projection needs the first "
                                 "images before any sums); use reduction=random (the default) or none to distribute")

    def shard_sums(self, images: Sequence, progress: bool = False) -> dict[str, Any]:
        """Partial per-patch sums over a shard of fitting images (run on a worker; see ``_fit_sharded``)."""
        self._check_shardable()
        self.device_ = resolve_device(self.device)
        model = self._build_model()
        acc = PatchGaussianAccumulator(*model.mean.shape)
        for z in self.embeddings(images, progress, "padim: shard statistics", model):
            acc.update(z)
        return acc.state()

    def _fit_sharded(self, images: Sequence, progress: bool, shards) -> None:
        """The fitting images' sums come from ``shards`` (added here); the held-out images, at most 64,
        are scored here exactly as in ``_fit``, then added."""
        self._check_shardable()
        model = self._build_model()
        order, n_fit = self._order(len(images))
        acc = PatchGaussianAccumulator(*model.mean.shape)
        for part in shards("shard_sums", [images[i] for i in order[:n_fit]]):
            acc.merge(part)
        held = [images[i] for i in order[n_fit:]]
        z = list(self.embeddings(held, progress, "padim: held-out", model)) if held else []
        self._finish(model, acc, torch.cat(z) if z else torch.empty(0), images)

    # ------------------------------------------------------------------ persistence
    def state_metadata(self) -> dict[str, Any]:
        model = self._model_as(PadimModel)
        return {"feature_size": list(model.feature_size), "channels": int(model.projection.shape[0]),
                "n_features": int(model.projection.shape[1])}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        extractor = self._make_extractor(pretrained=False).to(memory_format=torch.channels_last)
        return PadimModel(self._normalize(), extractor, tuple(state["feature_size"]), self.image_size, self.sigma,
                          torch.empty_like(tensors["centre"]), torch.empty_like(tensors["projection"]),
                          torch.empty_like(tensors["mean"]), torch.empty_like(tensors["inv_chol"]), self.score_top)
