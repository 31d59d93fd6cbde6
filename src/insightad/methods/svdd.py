"""Deep SVDD (Ruff et al., ICML 2018): normal images mapped close to a centre c; score = distance to c.

The network is a frozen backbone (levels 0-3; per level, the channel means and spatial standard deviations,
each L2-normalised), by default standardised per feature with the training normals' mean and
standard deviation (fixed buffers), followed by a trainable projection head. The paper's guards
against the trivial solution (every image mapped onto c) are kept: the head has no bias terms, c
is fixed from the mean embedding of the untrained network with coordinates too close to zero
pushed out to +-eps, and the weights are decayed. Objectives: ``one-class`` (mean squared distance
to c), ``soft-boundary`` (radius R plus 1/nu times the mean excess of the squared distances over
R^2, with R re-fitted each epoch as the (1 - nu) quantile of the training distances) and ``sad``
(the default; Deep SAD, Ruff et al., ICLR 2020: the one-class term on the normals plus
eta / (||phi(x) - c||^2 + 1e-6) on labelled anomalies, which pushes them away from c; the labelled
anomalies are the package's synthetic defects
(:mod:`insightad.data.defects`) painted on the training normals, never on test images).
By default three heads, each from its own random initialisation with its own centre, train together
(their losses add up); the score is the mean of their distances, each divided by its median over the
validation normals. One head's result depends on its initialisation (crack: 0.94 to 0.99 AUROC).
With a grid (default 8 x 8) the heads map every region, and the image score is the mean of its
``region_top`` (4) farthest regions' scores.

With the backbone frozen and no augmentation, the pooled features are computed once and the
head trains on them, so a hundred epochs cost seconds. ``sad`` computes the pooled features of its
synthetic anomalies once too (one more backbone pass per synthetic defect per normal); it needs
the cached features (no ``--augment``). A defect is made on a normal of the same split (training
or validation) with a donor of that split, so the validation loss sees no training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from insightad import config
from insightad.backbones.extractor import FeatureExtractor
from insightad.backbones.normalize import Normalize
from insightad.config import DetectorParams, TrainLoopParams, param, params
from insightad.data.defects import DEFECT_KINDS, SyntheticDefect, make_defects
from insightad.decide.thresholds import FitPolicy
from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.methods.components.pooling import REGION_TOP_HELP, farthest_regions, pool, pool_regions, region_coverage
from insightad.methods.registry import register_method
from insightad.training import TrainingLoop, data_fingerprint, fingerprint, load_images, validation_split

SVDD_OBJECTIVES = ("one-class", "soft-boundary", "sad")
SAD_KINDS = ("crack", "scratch", "blob", "missing")  # shapes drawn on the surface; cut-paste and texture
# take their content from other normals of the set, and on textures (concrete) that looks normal
DEFAULT_HEADS = 3  # heads=0. Crack seeds 0-2: one head 0.938-0.995 by its initialisation; three trained
# together 0.953-0.989 (docs/svdd.md)
REGION_SHARE = 0.25  # grid: a defect's regions covered at least this share of its most-covered region are labelled
SAD_EPS = 1e-6  # Deep SAD's guard in eta / (d^2 + eps): a labelled anomaly at c costs 1e6 * eta, not infinity

@params
class SVDDParams(TrainLoopParams, DetectorParams):
    """Deep SVDD: a bias-free projection head on frozen pooled backbone features, pulled towards a centre c."""

    layers: list[int] = param([0, 1, 2, 3], "backbone feature levels to pool (0 = finest, stride 2; adding it to "
                              "1-3 raised crack image AUROC 0.984 -> 0.990, docs/svdd.md)")
    pooling: str = param("mean_std", "per-channel statistics of each level: mean, or mean and spatial "
                         "standard deviation (sees thin local defects such as cracks better)",
                         choices=("mean", "mean_std"))
    objective: str = param("sad", "one-class: mean squared distance to c; soft-boundary: radius R "
                           "plus the distances beyond it, weighted by 1/nu; sad: Deep SAD, one-class on the "
                           "normals plus eta / distance^2 on synthetic defects made on the training normals "
                           "(pushed away from c)", choices=SVDD_OBJECTIVES)
    eta: float = param(1.0, "sad: weight of the labelled-anomaly term eta / (distance^2 + 1e-6)", minimum=0.0,
                       exclusive_min=True)
    synthetic_anomalies: int = param(1, "sad: synthetic defects made on each training normal (the labelled "
                                     "anomalies; each costs one more backbone pass)", minimum=1)
    synthetic_kinds: list[str] = param(list(SAD_KINDS), "sad: kinds of synthetic defect, in equal shares "
                                       f"(some of {', '.join(DEFECT_KINDS)})")
    nu: float = param(0.1, "soft-boundary: the fraction of training images allowed outside the sphere",
                      minimum=0.0, maximum=1.0, exclusive_min=True)
    grid: int = param(8, "regions per side: each of grid x grid regions pooled on its own and mapped by the head; "
                      "the image score comes from its farthest regions (--region-top; 1: the whole image). sad "
                      "labels a synthetic defect's regions by its mask", minimum=1, maximum=32)
    region_top: int = param(4, REGION_TOP_HELP, minimum=1)
    rep_dim: int = param(128, "dimension of the embedding space", minimum=1)
    heads: int = param(0, "projection heads, each initialised at random with its own centre, trained together; "
                       "the score is the mean of their distances, each divided by its median on the "
                       "validation normals (one head's AUROC depends on its initialisation by up to 0.05 on "
                       "crack); 0: 3, or 1 with soft-boundary (its radius is one head's)", minimum=0)
    hidden: list[int] = param([512], "hidden layer widths of the projection head (empty: one linear map)",
                              min_items=0)
    standardize: bool = param(True, "scale each pooled feature to zero mean and unit variance over the training "
                              "normals before the head (the shift and scale are stored in the model)")
    eps: float = param(0.1, "centre coordinates closer to zero than this are pushed out to +-eps "
                       "(a centre at 0 is trivially reached by zero weights)", minimum=0.0)
    warmup_epochs: int = param(2, "soft-boundary: epochs before the radius R is first updated", minimum=0)
    epochs: int = param(200, "training epochs (the head trains on cached features: seconds, not minutes)",
                        minimum=1, aliases=("--epoch",))
    patience: int = param(10, "early stopping: stop after this many epochs without improvement of the "
                          "validation loss (0: never stop early)", minimum=0)
    time_budget: float = param(600.0, "seconds of training after which it stops (after the current step; the "
                               "best weights so far are kept, early stopping still applies; 0: no budget)",
                               minimum=0.0)
    threshold_percentile: float = param(99.0, "default threshold (one-class): this percentile of the "
                                        "validation (else training) distances", minimum=0.0, maximum=100.0)

def projection_head(in_dim: int, hidden: Sequence[int], rep_dim: int) -> nn.Sequential:
    """A bias-free MLP (LeakyReLU between layers): no constant offset to map everything onto c with."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden, rep_dim]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Hypersphere(nn.Module):
    """Pooled features -> distance to the centre: the trainable head, the centre c, the radius R; with
    ``in_dim`` also a fixed per-feature shift and scale applied before the head (``standardize``)."""

    head: nn.Sequential
    center: torch.Tensor
    radius: torch.Tensor
    shift: torch.Tensor  # standardized only
    scale: torch.Tensor

    def __init__(self, head: nn.Sequential, center: torch.Tensor, radius: float = 0.0,
                 in_dim: int | None = None) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("center", center.float().clone())
        self.register_buffer("radius", torch.tensor(float(radius)))
        self.standardized = in_dim is not None
        if in_dim is not None:
            self.register_buffer("shift", torch.zeros(in_dim))
            self.register_buffer("scale", torch.ones(in_dim))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardized:
            features = (features - self.shift) / self.scale
        return self.head(features)

    def squared_distance(self, features: torch.Tensor) -> torch.Tensor:
        return ((self.embed(features) - self.center) ** 2).sum(dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.squared_distance(features).clamp_min(0.0).sqrt()


class SphereEnsemble(nn.Module):
    """Several :class:`Hypersphere` on the same features: score = the mean over members of distance / scale
    (each member's median distance over the validation normals, set after training; 1 before)."""

    scales: torch.Tensor

    def __init__(self, spheres: Sequence[Hypersphere]) -> None:
        super().__init__()
        self.spheres = nn.ModuleList(spheres)
        self.register_buffer("scales", torch.ones(len(spheres)))

    def members(self) -> list[Hypersphere]:
        return [cast(Hypersphere, m) for m in self.spheres]

    def squared_distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, members) squared distances, unscaled (what each member is trained on)."""
        return torch.stack([m.squared_distance(features) for m in self.members()], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.squared_distances(features).clamp_min(0.0).sqrt() / self.scales).mean(dim=1)


def squared_distances(model: Hypersphere | SphereEnsemble, features: torch.Tensor) -> torch.Tensor:
    """(B, members) squared distances of a sphere (one member) or an ensemble."""
    if isinstance(model, SphereEnsemble):
        return model.squared_distances(features)
    return model.squared_distance(features).unsqueeze(1)


def members(model: Hypersphere | SphereEnsemble) -> list[Hypersphere]:
    return model.members() if isinstance(model, SphereEnsemble) else [model]


class PooledFeatures(nn.Module):
    """uint8 images -> pooled backbone features (frozen; stays in eval mode): (B, D), or (B, grid*grid, D)
    with a grid."""

    def __init__(self, normalize: Normalize, extractor: FeatureExtractor, pooling: str = "mean",
                 grid: int = 1) -> None:
        super().__init__()
        self.normalize, self.extractor, self.pooling, self.grid = normalize, extractor, pooling, int(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.extractor(self.normalize(x)))

    def pool(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels -> the pooled vector per image (B, D), or per region (B, grid*grid, D)."""
        return pool(feats, self.pooling) if self.grid == 1 else pool_regions(feats, self.pooling, self.grid)

    def train(self, mode: bool = True) -> PooledFeatures:
        return super().train(False)  # frozen: batch-norm statistics never move


class SVDDModel(nn.Module):
    """uint8 images -> (distance to c,); with a grid the mean over the ``top`` farthest regions."""

    features: PooledFeatures
    sphere: Hypersphere | SphereEnsemble

    def __init__(self, features: PooledFeatures, sphere: Hypersphere | SphereEnsemble, top: int = 1) -> None:
        super().__init__()
        self.features, self.sphere, self.top = features, sphere, int(top)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return self.from_levels(self.features.extractor(self.features.normalize(x)))

    def backbone(self) -> tuple[nn.Module, nn.Module]:
        """(normalize, extractor): what ``from_levels`` expects to have run."""
        return self.features.normalize, self.features.extractor

    def from_levels(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor]:
        """The model on backbone levels already computed (an ensemble runs a shared backbone once)."""
        return (farthest_region(self.sphere, self.features.pool(feats), self.top),)


def farthest_region(sphere: nn.Module, pooled: torch.Tensor, top: int = 1) -> torch.Tensor:
    """Image scores: the sphere's score of each image (B, D), or the mean of its ``top`` farthest regions'
    (B, R, D)."""
    return per_image_top(sphere(as_rows(pooled)), pooled, top)


def per_image_top(values: torch.Tensor, pooled: torch.Tensor, top: int = 1) -> torch.Tensor:
    """Values of ``as_rows(pooled)`` (rows first) -> per image: as they are for images (B, D); for regions
    (B, R, D) the largest over each image's regions, or the mean of its ``top`` largest (at most R)."""
    if pooled.dim() == 2:
        return values
    return farthest_regions(values.reshape(pooled.shape[0], pooled.shape[1], *values.shape[1:]), top)


def as_rows(pooled: torch.Tensor) -> torch.Tensor:
    """The head's rows: images' pooled features (N, D) as they are, regions (N, R, D) -> (N*R, D); images (N, C,
    H, W, when augmenting) as they are (their regions are rowed after the backbone)."""
    return pooled.flatten(0, 1) if pooled.dim() == 3 else pooled


def fixed_center(embeddings: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean embedding with every coordinate of magnitude below ``eps`` moved to +-eps (sign kept, 0 -> +eps)."""
    c = embeddings.mean(dim=0)
    small = c.abs() < eps
    c[small & (c < 0)] = -eps
    c[small & (c >= 0)] = eps
    return c


def _as_sphere(model: nn.Module) -> Hypersphere | SphereEnsemble:
    """The loop hands objectives a plain module; this one trains a Hypersphere or an ensemble of them."""
    if not isinstance(model, (Hypersphere, SphereEnsemble)):
        raise InsightADError(f"svdd: the objective trains a Hypersphere, not a {type(model).__name__}")
    return model


def with_labels(features: torch.Tensor, label: float) -> torch.Tensor:
    """Features with a last column holding the label (0: normal, 1: labelled anomaly), as ``sad`` trains on."""
    return torch.cat([features, torch.full((len(features), 1), float(label), dtype=features.dtype)], dim=1)


def synthetic_anomalies(normals: Sequence[np.ndarray], per_image: int, kinds: Sequence[str], seed: int
                        ) -> list[SyntheticDefect]:
    """``per_image`` synthetic defects (uint8 (H, W, C), with their masks) on each of ``normals`` (uint8 at model
    size), kinds in equal shares, donors from the same set; the same for the same seed."""
    if not len(normals):
        return []
    return make_defects(list(normals), seed=seed, kinds=kinds, per_image=per_image)


def defect_regions(masks: Sequence[np.ndarray], grid: int, share: float = REGION_SHARE) -> torch.Tensor:
    """(M, grid*grid) bool: the regions a synthetic defect labels anomalous, those holding at least ``share`` of
    the defect's largest coverage of a region (a sliver of a defect in a region leaves it looking normal)."""
    cover = region_coverage(torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) for m in masks])), grid)
    return (cover > 0) & (cover >= share * cover.amax(1, keepdim=True))


class SVDDObjective:
    """One-class, soft-boundary or Deep SAD loss on a :class:`Hypersphere`; inputs are features or
    (augmented) images; for ``sad`` features with a last label column (:func:`with_labels`)."""

    def __init__(self, objective: str, nu: float, warmup_epochs: int, features: PooledFeatures | None,
                 eta: float = 1.0) -> None:
        self.objective, self.nu, self.warmup, self.eta = objective, nu, warmup_epochs, eta
        self.features = features  # set when the loop feeds images (augmentation): features on the fly
        self.inputs_are_images = features is not None
        self._epoch_d2: list[torch.Tensor] = []

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            return batch
        with torch.no_grad():
            return as_rows(self.features(batch))  # with a grid: every region of the augmented images

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        model = _as_sphere(model)
        if self.objective == "sad":
            return self._sad_loss(model, batch)
        if self.objective == "soft-boundary":
            if not isinstance(model, Hypersphere):
                raise InsightADError("svdd: objective soft-boundary trains one head (its radius is the threshold); "
                                     "use --heads 1")
            d2 = model.squared_distance(self._features(batch))
            if model.training:
                self._epoch_d2.append(d2.detach())
            r2 = model.radius ** 2
            loss = r2 + (d2 - r2).clamp_min(0.0).mean() / self.nu
            return loss, {"outside": float((d2.detach() > r2).float().mean())}
        return squared_distances(model, self._features(batch)).mean(dim=0).sum(), {}  # members add up

    def _sad_loss(self, model: Hypersphere | SphereEnsemble, batch: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Deep SAD: the mean over the batch of d^2 (normals) and eta / (d^2 + eps) (labelled anomalies), added
        up over an ensemble's members (each trains on its own distances)."""
        features, anomalous = batch[:, :-1], batch[:, -1] > 0.5
        d2s = squared_distances(model, features)
        loss = torch.where(anomalous.unsqueeze(1), self.eta / (d2s + SAD_EPS), d2s).mean(dim=0).sum()
        d2 = d2s.mean(dim=1)
        metrics = {}
        if bool(anomalous.any()) and bool((~anomalous).any()):  # how often a labelled anomaly lies inside
            inside = d2.detach()[anomalous] < d2.detach()[~anomalous].max()  # the farthest normal of the batch
            metrics["anomalies_inside"] = float(inside.float().mean())
        return loss, metrics

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        """Soft-boundary: after the warm-up, R = the (1 - nu) quantile of this epoch's training distances."""
        model = _as_sphere(model)
        if not self._epoch_d2 or not isinstance(model, Hypersphere):
            return
        d2, self._epoch_d2 = torch.cat(self._epoch_d2), []
        if self.objective == "soft-boundary" and epoch + 1 >= self.warmup:
            r = torch.quantile(d2.clamp_min(0.0).sqrt().double(), 1.0 - self.nu).float()
            model.radius.copy_(r)


@register_method("svdd")
class SVDDDetector(SVDDParams, Detector):
    """Image-level detector: distance of the embedding to the centre c (higher = more anomalous)."""

    Params = SVDDParams
    # Files from before these settings: no shift and scale, one head.
    legacy_params: ClassVar[dict[str, Any]] = {"standardize": False, "heads": 1, "grid": 1, "region_top": 1}

    def _fit(self, images: Sequence, progress: bool) -> None:
        loop = TrainingLoop(config.build(config.TrainLoopParams, {k: getattr(self, k) for k in
                                         config.TrainLoopParams.__dataclass_fields__}),
                            name="svdd", progress=progress,
                            fingerprint=fingerprint(self.Params(**self.get_params()), **data_fingerprint(images)))
        extractor = self._make_extractor()
        features = PooledFeatures(self._normalize(), extractor, self.pooling, self.grid).to(self.device_).eval()
        on_images = self.augment != "none"
        sad = self.objective == "sad"
        if sad and on_images:
            raise InsightADError("svdd: objective sad trains on cached features with labels; it cannot "
                                 "augment images (use --augment none, or --objective one-class to augment)")
        if sad and (not self.synthetic_kinds or any(k not in DEFECT_KINDS for k in self.synthetic_kinds)):
            raise InsightADError(f"synthetic_kinds: expected some of {', '.join(DEFECT_KINDS)}, "
                                 f"got {list(self.synthetic_kinds)!r}")
        arrays: list[np.ndarray] | None = [] if sad else None
        data = self._inputs(images, features, on_images, progress, arrays)
        tr, va = validation_split(len(images), self.val_fraction, self.seed)
        train, val = data[tr], (data[va] if len(va) else None)  # images (with a grid: their regions)
        rows_train, rows_val = as_rows(train), (as_rows(val) if val is not None else None)
        in_dim = int(self._probe_dim(features, rows_train[:1], on_images))
        sphere = self._spheres(in_dim, features, rows_train, on_images)
        objective = SVDDObjective(self.objective, self.nu, self.warmup_epochs, features if on_images else None,
                                  eta=self.eta)
        if arrays is not None:  # sad: normals (label 0) and synthetic anomalies of the same split (label 1)
            self.n_anomalies_ = 0
            loop_train = self._labelled(rows_train, [arrays[i] for i in tr], features, self.seed, progress)
            loop_val = (self._labelled(rows_val, [arrays[i] for i in va], features, self.seed + 1, progress)
                        if rows_val is not None else None)
            self.training_ = loop.run(sphere, objective, loop_train, loop_val)
        else:
            self.training_ = loop.run(sphere, objective, rows_train, rows_val)
        self.__dict__.pop("_run_features", None)  # the fit's backbone runner is not part of the model
        if isinstance(sphere, SphereEnsemble):
            self._member_scales(sphere, features, val if val is not None else train, on_images)
        self.model_ = SVDDModel(features, sphere, self.region_top).to(self.device_).eval()
        self._score_normals(sphere, features, train, val, on_images)

    def _spheres(self, in_dim: int, features: PooledFeatures, train: torch.Tensor, on_images: bool
                 ) -> Hypersphere | SphereEnsemble:
        """The untrained model: ``heads`` heads (each its own random initialisation, drawn in turn from the
        seeded generator), the standardisation of the training normals, each head's fixed centre."""
        count = self.heads or (1 if self.objective == "soft-boundary" else DEFAULT_HEADS)
        if count > 1 and self.objective == "soft-boundary":
            raise InsightADError(f"heads: objective soft-boundary trains one head (its radius is the threshold), "
                                 f"got {count}; use --heads 1 (or 0)")
        spheres = [Hypersphere(projection_head(in_dim, self.hidden, self.rep_dim), torch.zeros(self.rep_dim),
                               in_dim=in_dim if self.standardize else None).to(self.device_) for _ in range(count)]
        if self.standardize:
            normal = as_rows(self._distances(spheres[0], features, train, on_images, pooled=True))
            shift = normal.mean(dim=0)
            scale = normal.std(dim=0).clamp_min(1e-6) if len(normal) > 1 else torch.ones(in_dim)
            for m in spheres:
                m.shift.copy_(shift)
                m.scale.copy_(scale)
        for m in spheres:
            m.center.copy_(self._initial_center(m, features, train, on_images))
        return spheres[0] if len(spheres) == 1 else SphereEnsemble(spheres).to(self.device_)

    @torch.no_grad()
    def _member_scales(self, sphere: SphereEnsemble, features: PooledFeatures, normals: torch.Tensor,
                       on_images: bool) -> None:
        """Each member's median image score over ``normals`` (the validation split; with a grid, the mean of the
        ``region_top`` regions farthest for that member, where the image score takes them after the members'
        mean): members trained from other initialisations land at other scales, and the mean of raw distances
        would follow the largest. With a grid the image's farthest regions set the scale, not the median region:
        the tail over a few dozen regions varies more between networks than their middle does."""
        pooled = self._distances(sphere, features, normals, on_images, pooled=True).to(self.device_)
        d = per_image_top(sphere.squared_distances(as_rows(pooled)).clamp_min(0.0).sqrt(), pooled, self.region_top)
        sphere.scales.copy_(d.median(dim=0).values.clamp_min(1e-12))

    def _inputs(self, images: Sequence, features: PooledFeatures, on_images: bool, progress: bool,
                arrays: list[np.ndarray] | None = None) -> torch.Tensor:
        """The loop's inputs: uint8 images when augmenting, else the frozen pooled features (computed once).
        ``arrays``: a list to collect the images at model size in (uint8 (H, W, C); sad makes its defects on them)."""
        if on_images:
            return load_images(images, self.preprocessing_, self.batch_size, self.workers, progress, "svdd: load images")
        self._run_features = self._feature_runner(features.extractor)  # the frozen backbone on the fast engine
        return self._pooled(images, features, progress, "svdd: features", arrays)

    def _pooled(self, images: Sequence, features: PooledFeatures, progress: bool, desc: str,
                arrays: list[np.ndarray] | None = None) -> torch.Tensor:
        """Pooled features of ``images`` through the fit's backbone runner (see :meth:`_inputs`): (N, D), or
        (N, grid*grid, D) with a grid."""
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(images, progress, desc):
                if arrays is not None:
                    pixels = batch.images.permute(0, 2, 3, 1).numpy()
                    arrays.extend(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
                chunks.append(features.pool(self._run_features(batch.images)).float().cpu())
        return torch.cat(chunks)

    def _labelled(self, normals: torch.Tensor, arrays: list[np.ndarray], features: PooledFeatures, seed: int,
                  progress: bool) -> torch.Tensor:
        """sad: the normals' rows (label 0) and those of synthetic defects made on them (label 1). With a grid, a
        defect's rows are the regions its mask covers (``defect_regions``), repeated so that labelled anomalies
        weigh against the normal regions as whole defective images weigh against normal images without one."""
        made = synthetic_anomalies(arrays, self.synthetic_anomalies, self.synthetic_kinds, seed)
        parts = [with_labels(normals, 0.0)]
        if made:
            pooled = self._pooled([d.image for d in made], features, progress, "svdd: synthetic anomalies")
            if pooled.dim() == 3:
                pooled = pooled[defect_regions([d.mask for d in made], self.grid)]
                pooled = pooled.repeat(max(1, round(len(normals) * len(made) / (len(arrays) * max(1, len(pooled))))), 1)
            parts.append(with_labels(pooled, 1.0))
            self.n_anomalies_ += len(made)
        return torch.cat(parts)

    def _probe_dim(self, features: PooledFeatures, first: torch.Tensor, on_images: bool) -> int:
        if not on_images:
            return first.shape[1]
        with torch.inference_mode():
            return features(first.to(self.device_)).shape[-1]

    @torch.no_grad()
    def _distances(self, sphere: Hypersphere | SphereEnsemble, features: PooledFeatures, data: torch.Tensor,
                   on_images: bool,
                   embed: bool = False, pooled: bool = False) -> torch.Tensor:
        """Distances to c of ``data`` (features or images; images' regions (N, R, D): as the image is scored);
        ``embed``: the embeddings; ``pooled``: the features."""
        out = []
        sphere.eval()
        for chunk in data.split(self.batch_size):
            f = chunk.to(self.device_)
            if on_images:
                f = features(f)
            out.append((f if pooled else cast(Hypersphere, sphere).embed(as_rows(f)) if embed
                        else farthest_region(sphere, f, self.region_top)).cpu())
        return torch.cat(out)

    def _initial_center(self, sphere: Hypersphere, features: PooledFeatures, train: torch.Tensor,
                        on_images: bool) -> torch.Tensor:
        emb = self._distances(sphere, features, train, on_images, embed=True)
        return fixed_center(emb, self.eps).to(self.device_)

    def _score_normals(self, sphere: Hypersphere | SphereEnsemble, features: PooledFeatures, train: torch.Tensor,
                               val: torch.Tensor | None, on_images: bool) -> None:
        """Soft-boundary: the radius R. One-class: a percentile of held-out (else training) distances."""
        self.train_scores_ = self._distances(sphere, features, train, on_images).double().numpy()
        held = val is not None
        scores = self._distances(sphere, features, val, on_images).double().numpy() if val is not None else self.train_scores_
        self.decision_scores_, self.decision_source_ = scores, ("val" if held else "train")
        if self.objective == "soft-boundary":
            # R during training came from each epoch's batches, before that epoch's updates; for the
            # final weights the optimal R is the (1 - nu) quantile of the final training distances.
            members(sphere)[0].radius.fill_(float(np.quantile(self.train_scores_, 1.0 - self.nu)))

    def _threshold_policy(self) -> FitPolicy:
        """Soft-boundary: the radius R. One-class: a percentile of held-out (else training) distances."""
        policy = super()._threshold_policy()
        if self.objective == "soft-boundary":
            radius = float(members(self.model_.sphere)[0].radius) if isinstance(self.model_, SVDDModel) else None
            return replace(policy, fixed=radius, fixed_name="svdd_radius", extra={"nu": self.nu})
        return policy

    def state_metadata(self) -> dict[str, Any]:
        t = getattr(self, "training_", None)
        first = members(self._model_as(SVDDModel).sphere)[0]
        return {"in_dim": int(cast(nn.Linear, first.head[0]).in_features), "objective": self.objective,
                "radius": float(first.radius), "training": t.summary() if t else None,
                "synthetic_anomalies": getattr(self, "n_anomalies_", None)}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        extractor = self._make_extractor(pretrained=False)
        ensemble = any(k.startswith("sphere.spheres.") for k in tensors)
        prefix = "sphere.spheres.0." if ensemble else "sphere."
        shapes = [tensors[k].shape for k in sorted((k for k in tensors if k.startswith(prefix + "head.")),
                                                    key=lambda k: int(k[len(prefix):].split(".")[1]))]
        in_dim = shapes[0][1] if shapes else int(state.get("in_dim", 1))
        hidden = [s[0] for s in shapes[:-1]]
        rep_dim = shapes[-1][0] if shapes else self.rep_dim
        count = len({k.split(".")[2] for k in tensors if k.startswith("sphere.spheres.")}) if ensemble else 1
        spheres = [Hypersphere(projection_head(in_dim, hidden, rep_dim), torch.empty(rep_dim),
                               in_dim=in_dim if prefix + "shift" in tensors else None) for _ in range(count)]
        sphere = SphereEnsemble(spheres) if ensemble else spheres[0]
        return SVDDModel(PooledFeatures(self._normalize(), extractor, self.pooling, self.grid), sphere,
                         self.region_top)
