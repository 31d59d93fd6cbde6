"""Out-of-fold validation: every validation normal (and the synthetic defect made on it) is scored
by a model that never saw that normal.

Schemes, by method:

- ``padim`` (random or no channel reduction): exact k-fold cross-fitting from its additive
  statistics. The per-position sums of all training images are read back from the final model's
  factors (``FactorStatistics``; summed again over a backbone pass only where they cannot be); each
  fold's model is those sums minus the fold's own, which is exactly the model fitted without the fold
  (up to the float32 rounding of the factors), formed chunk by chunk of positions (no second P x d x d
  buffer). Cost: one extra backbone pass over the training images, no refit. A fold model has seen fewer
  images than the final one, so its Mahalanobis distances run larger (Hotelling's T^2); they are
  scaled to the final model's sample size (``sample_size_factor``), or the threshold lands far above
  new normals (concrete: 1.2% recall at the default threshold, with 200 images and d=120 and no
  shrinkage). How much larger is measured on the first fold (each half of it scored again by the model
  without only that half: ``PatchGaussianAccumulator.growth``), since shrinkage makes the growth far
  smaller than Hotelling's d+2 (taken as it was, the threshold let 30-48% of new concrete normals
  through at a 2% target). Cost: two more distance passes on the first fold.
- ``baseline``: exact k-fold too: pooled embeddings are computed once; each fold's model is the
  kNN bank (or the Gaussian) of the other folds' embeddings. Cost: one extra backbone pass.
- ``patchcore``: every training normal (and the synthetic defect made on it) scored against the final
  memory bank without that normal's own patches (``bank-without-image``; tiled models: as below).
- every other method (the trained ``svdd`` and ``autoencoder``, and every tiled model): one held-out
  fold (1/k of the images); the method is refitted once on the other folds. Train time grows by
  under 2x instead of k x, and the validation set is the fold (its size is stated and warned about).
  ``refit_folds="all"`` (``train --refit-folds all``) refits every fold instead: all training normals
  scored, k refits.

The final model is always fitted on all training normals (by the caller): validation models
are thrown away.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from insightad.config import REFIT_FOLDS
from insightad.data.defects import DEFECT_KINDS, SyntheticDefect, make_defects
from insightad.decide.decisions import DEFAULT_MAX_FALSE_ALARMS, DecisionRecord, decide
from insightad.decide.normalize import robust_scale
from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.methods.baseline import BaselineDetector, BaselineModel, fit_gaussian, image_knn, image_mahalanobis
from insightad.methods.components.patch_gaussian import (
    FactorStatistics,
    PatchGaussianAccumulator,
    half_fold_dimension,
    sample_size_factor,
)
from insightad.methods.padim import PadimDetector, PadimModel
from insightad.methods.patchcore import PatchCoreDetector, PatchCoreModel
from insightad.methods.tiling import is_tiled
from insightad.runtime import release_free_memory

if TYPE_CHECKING:
    from insightad.engines.features import FeatureFn

DEFAULT_FOLDS = 5
EXAMPLE_IMAGES = 3  # synthetic defects per kind whose images validation keeps: the train report's examples
REFIT_ALL_FOLDS: tuple[str, ...] = ()  # methods whose k-fold refit is cheap enough to do for every fold
MIN_VALIDATION_NORMALS = 20


@dataclass
class OutOfFold:
    """Out-of-fold scores of validation normals and of one synthetic defect per validation normal."""

    scheme: str
    normal_index: np.ndarray  # which training images were validation normals
    normal_scores: np.ndarray
    defects: list[SyntheticDefect] = field(default_factory=list)  # images kept for EXAMPLE_IMAGES per kind only
    defect_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    defect_maps: list[np.ndarray] | None = None  # at model size; None for image-level methods
    normal_map_max: np.ndarray | None = None
    seconds: float = 0.0
    size_correction: dict[str, float] | None = None  # kfold-exact PaDiM and baseline: how fold distances were rescaled

    @property
    def defect_kinds(self) -> list[str]:
        return [d.kind for d in self.defects]


def fold_ids(n: int, k: int, seed: int) -> np.ndarray:
    """A fold number per image: a seeded permutation cut into ``k`` near-equal folds."""
    if n < 2:
        raise InsightADError(f"validation: out-of-fold scores need at least 2 training images, got {n}")
    k = max(2, min(int(k), n))
    out = np.empty(n, dtype=np.int64)
    out[np.random.default_rng([int(seed), 13]).permutation(n)] = np.arange(n) % k
    return out


def clone_unfitted(det: Detector) -> Detector:
    """A fresh detector with the same hyper-parameters, except that a trained method's validation
    model neither writes into nor resumes from the final model's checkpoint folder (that checkpoint
    saw the held-out fold)."""
    params = det.get_params()
    for key, off in (("checkpoint_dir", None), ("resume", False)):
        if key in params:
            params[key] = off
    return type(det)(**params)


def at_model_size(det: Detector, images: Sequence) -> list[np.ndarray]:
    """Images decoded and resized exactly as the detector's preprocessing does, as float32 (H, W[, C]) 0..255
    (scoring them again gives the scores of the files themselves)."""
    out = []
    for src in images:
        t, _ = det.preprocessing_.load(getattr(src, "path", src))
        a = t.transpose(1, 2, 0)
        out.append(a[..., 0] if a.shape[2] == 1 else a)
    return out


def scheme_for(det: Detector, refit_folds: str = "one") -> str:
    """How ``det`` is validated out of fold. The exact schemes read whole-image features through the method's
    own model; a tiled model fits on tiles, so it is refitted on the other folds instead (its whole-image
    features at the working size are not what it scores: padim failed on them, baseline took a wrong threshold).
    ``refit_folds``: what a refitted method refits, ``one`` held-out fold or ``all`` of them."""
    if refit_folds not in REFIT_FOLDS:
        raise InsightADError(f"refit_folds: expected one of {', '.join(REFIT_FOLDS)}, got {refit_folds!r}")
    exact = (det.method == "padim" and getattr(det, "reduction", "random") != "pca") or det.method == "baseline"
    if exact and not is_tiled(det):
        return "kfold-exact"
    if isinstance(det, PatchCoreDetector) and getattr(det, "bank_source_", None) is not None and not is_tiled(det):
        return "bank-without-image"  # (a tiled bank's patches come from tiles, not from whole images)
    return "kfold-refit" if refit_folds == "all" or det.method in REFIT_ALL_FOLDS else "heldout-fold"


def out_of_fold(det: Detector, images: Sequence, k: int = DEFAULT_FOLDS, seed: int = 0, synthetic: bool = True,
                kinds: Sequence[str] = DEFECT_KINDS, scheme: str | None = None, refit_folds: str = "one") -> OutOfFold:
    """Out-of-fold scores for ``images`` (the training normals) with ``det``'s hyper-parameters.

    ``det`` is the final model, already fitted on all ``images`` (kfold-exact reads its projection
    and backbone); it is not changed.
    """
    t0 = time.perf_counter()
    folds = fold_ids(len(images), k, seed)
    combined = getattr(det, "members_out_of_fold", None)  # an ensemble: its members' validations, combined
    if scheme is None and combined is not None:
        res = combined(k, seed)
        if res is not None:
            res.seconds = time.perf_counter() - t0
            res.scheme = f"members (k={int(folds.max()) + 1}, the normals and defects every member scored)"
            return res
    scheme = scheme or scheme_for(det, refit_folds)
    if scheme == "kfold-exact" and det.method in ("padim", "baseline"):
        exact = _padim_exact if det.method == "padim" else _baseline_exact
        res = exact(det, images, folds, seed, synthetic, kinds)
    elif scheme == "bank-without-image" and isinstance(det, PatchCoreDetector):
        res = _patchcore_without_image(det, images, folds, seed, synthetic, kinds)
    elif scheme in ("kfold-refit", "heldout-fold"):
        fitted = sorted(set(folds.tolist())) if scheme == "kfold-refit" else [0]
        res = _refit(det, images, folds, fitted, seed, synthetic, kinds)
    else:
        raise InsightADError(f"validation scheme: expected kfold-exact, kfold-refit or heldout-fold, got {scheme!r}")
    res.scheme = f"{scheme} (k={int(folds.max()) + 1})"
    res.seconds = time.perf_counter() - t0
    return res


def _defects_for(arrays: list[np.ndarray], index: np.ndarray, seed: int, synthetic: bool,
                 kinds: Sequence[str], start: int = 0) -> list[SyntheticDefect]:
    """One synthetic defect per normal of a fold, the kinds taken in turn from the ``start``-th (callers: fold number
    x fold size, about the defects the folds before made): each fold began again at the first kind, so folds of
    1-5 normals never made the last ones (20 normals in 5 folds: no blob, no missing piece)."""
    if not synthetic or len(arrays) < 1:
        return []
    turn = int(start) % max(len(kinds), 1)
    kinds = (*kinds[turn:], *kinds[:turn])
    made = make_defects([np.clip(np.rint(a), 0, 255).astype(np.uint8) for a in arrays], seed=seed, kinds=kinds)
    return [SyntheticDefect(d.image, d.mask, d.kind, int(index[d.source])) for d in made]


@dataclass
class _Folds:
    """Fold by fold results (each fold's normals first, then their synthetic defects; maps at model size for
    methods that have them), gathered into one ``OutOfFold`` in the normals' order."""

    n_index: list[np.ndarray] = field(default_factory=list)
    n_scores: list[np.ndarray] = field(default_factory=list)
    n_max: list[np.ndarray] = field(default_factory=list)
    d_scores: list[np.ndarray] = field(default_factory=list)
    d_maps: list[np.ndarray] | None = None
    defects: list[SyntheticDefect] = field(default_factory=list)
    shown: dict[str, int] = field(default_factory=dict)  # defect images kept so far, per kind

    def add(self, held: np.ndarray, made: list[SyntheticDefect], scores: np.ndarray,
            maps: np.ndarray | Sequence[np.ndarray] | None = None) -> None:
        k = len(held)
        self.n_index.append(held)
        self.n_scores.append(scores[:k])
        self.d_scores.append(scores[k:])
        self.defects.extend(self._example_or_bare(d) for d in made)
        if maps is not None:
            self.n_max.append(np.array([float(np.max(m)) for m in maps[:k]]))
            if self.d_maps is None:
                self.d_maps = []
            # copies: views would keep every fold's whole map array (its normals' maps too) alive to the end
            self.d_maps.extend(np.array(m) for m in maps[k:])

    def _example_or_bare(self, d: SyntheticDefect) -> SyntheticDefect:
        """``d`` as made for the first ``EXAMPLE_IMAGES`` of its kind, else without its image (an empty array):
        nothing after validation looks at the others' pixels, and every fold's were kept to the end (200 kB
        each at 256 px, 40 MB on bottle's 209 images, under the last fold's peak)."""
        n = self.shown.get(d.kind, 0)
        if n < EXAMPLE_IMAGES:
            self.shown[d.kind] = n + 1
            return d
        return replace(d, image=np.empty((0,), dtype=np.uint8))

    def result(self) -> OutOfFold:
        idx = np.concatenate(self.n_index)
        order = np.argsort(idx, kind="stable")
        return OutOfFold("", idx[order], np.concatenate(self.n_scores)[order], self.defects,
                         np.concatenate(self.d_scores) if self.d_scores else np.empty(0), self.d_maps,
                         np.concatenate(self.n_max)[order] if self.n_max else None)


def _refit(det: Detector, images: Sequence, folds: np.ndarray, fitted: list[int], seed: int, synthetic: bool,
           kinds: Sequence[str]) -> OutOfFold:
    gathered = _Folds()
    for f in fitted:
        held = np.flatnonzero(folds == f)
        rest = [images[int(i)] for i in np.flatnonzero(folds != f)]
        fold_det = clone_unfitted(det).fit(rest)
        arrays = at_model_size(fold_det, [images[int(i)] for i in held])
        made = _defects_for(arrays, held, seed + 101 * f, synthetic, kinds, f * len(held))
        pred = fold_det.predict(arrays + [d.image for d in made], maps=det.has_maps)
        # strict predict: every image was read, so every map is there
        gathered.add(held, made, pred.scores, cast("list[np.ndarray] | None", pred.maps))
    return gathered.result()


# ------------------------------------------------------------------------------ PatchCore, without the image
def _patchcore_without_image(det: PatchCoreDetector, images: Sequence, folds: np.ndarray, seed: int,
                             synthetic: bool, kinds: Sequence[str]) -> OutOfFold:
    """Every training normal, and the synthetic defect made on it, scored against the final memory bank
    without that normal's own patches (exact search). A refitted fold (the other methods' scheme) has a bank
    from 1/k fewer images, so every patch is farther from its nearest neighbour: on concrete its threshold
    sat above all 50 held-out normals and caught 22% of the cracks, with 40 validation normals and a tail
    model; here all training normals are validated, no refit. The folds only seed the synthetic defects as
    for the other schemes. Slightly optimistic: the coreset was chosen with every image in view."""
    det._check_fitted()
    features = det._feature_runner(det._model_as(PatchCoreModel).extractor)
    gathered = _Folds()
    for f in sorted(set(folds.tolist())):
        held = np.flatnonzero(folds == f)
        arrays = at_model_size(det, [images[int(i)] for i in held])
        made = _defects_for(arrays, held, seed + 101 * f, synthetic, kinds, f * len(held))
        scores, maps = det.score_without_source(arrays + [d.image for d in made],
                                                [int(i) for i in held] + [d.source for d in made], features)
        gathered.add(held, made, scores, maps)
    return gathered.result()


# ------------------------------------------------------------------------------ baseline, exact
def _embeddings(det: BaselineDetector, sources: Sequence) -> torch.Tensor:
    """Pooled embeddings of images through the fitted model's backbone on its fit's engine."""
    return det._embeddings(det._model_as(BaselineModel).extractor, list(sources), False)


def _baseline_exact(det: Detector, images: Sequence, folds: np.ndarray, seed: int, synthetic: bool,
                    kinds: Sequence[str]) -> OutOfFold:
    det._check_fitted()
    if not isinstance(det, BaselineDetector):
        raise InsightADError(f"validation: kfold-exact for baseline needs a BaselineDetector, got {type(det).__name__}")
    per_fold = []
    for f in sorted(set(folds.tolist())):
        held = np.flatnonzero(folds == f)
        arrays = at_model_size(det, [images[int(i)] for i in held])
        made = _defects_for(arrays, held, seed + 101 * f, synthetic, kinds, f * len(held))
        per_fold.append((held, made, _embeddings(det, arrays + [d.image for d in made])))
    emb = torch.empty(len(images), *per_fold[0][2].shape[1:])  # (N, regions, D)
    for held, _made, e in per_fold:
        emb[torch.as_tensor(held)] = e[:len(held)]
    n = len(images)
    c: float | None = None  # the Gaussian's distance growth with fewer images, measured on the first fold
    factor = 1.0
    gathered = _Folds()
    for held, made, e in per_fold:
        rest = emb[torch.as_tensor(np.setdiff1d(np.arange(n), held))]
        if det.scorer == "knn":
            s = image_knn(e, rest.flatten(0, 1), min(det.k, rest.shape[0] * rest.shape[1]), det.region_top)
        else:
            s = _gaussian_distances(rest, e, det.region_top)
            if c is None:
                c = _gaussian_growth(emb, held, s[:len(held)], det.region_top)
            factor = sample_size_factor(n, n - len(held), c)  # as for PaDiM: fold models saw fewer images
            s = s * factor
        gathered.add(held, made, s.double().numpy())
    out = gathered.result()
    if c is not None:
        out.size_correction = {"effective_c": round(c, 2), "last_fold_factor": round(factor, 4)}
    return out


def _gaussian_distances(train: torch.Tensor, queries: torch.Tensor, top: int = 1) -> torch.Tensor:
    """Image scores of ``queries`` under the baseline's Gaussian fitted on ``train`` (region embeddings, (N, R, D)):
    the farthest region's distance (the mean of the ``top`` farthest)."""
    return image_mahalanobis(queries, *fit_gaussian(train), top)


def _gaussian_growth(emb: torch.Tensor, held: np.ndarray, fold_distances: torch.Tensor, top: int = 1) -> float:
    """``half_fold_dimension`` for the baseline's Gaussian: each half of the fold scored again by the Gaussian of
    every other image (more images than the fold's model had), against ``fold_distances``."""
    n = emb.shape[0]

    def rescore(half: slice) -> torch.Tensor:
        part = held[half]
        return _gaussian_distances(emb[torch.as_tensor(np.setdiff1d(np.arange(n), part))], emb[torch.as_tensor(part)],
                                   top)

    return half_fold_dimension(n, fold_distances, rescore)


# ------------------------------------------------------------------------------ PaDiM, exact
def _padim_features(det: PadimDetector, arrays_or_paths: Sequence, features: FeatureFn, half: bool = False
                    ) -> torch.Tensor:
    """Reduced patch features (N, P, d) of images, through the fitted model's own layers and its fit's engine.

    ``half``: kept at half precision (39 instead of 78 MB for a fold's synthetic defects on bottle, under the
    factors at train's peak), for features that are only scored (each chunk of positions is converted to
    float32 for it); features beyond half precision's range are taken again at full precision. Never for
    features whose sums are subtracted from the model's: with few images the covariances are near singular
    and the rounding moved out-of-fold scores by 1.5% (12 images, 24 features)."""
    shape = (len(arrays_or_paths), *det._model_as(PadimModel).mean.shape)
    out = torch.empty(shape, dtype=torch.float16 if half else torch.float32)
    n = det.embed_into(arrays_or_paths, out, "padim: validation", features)
    if half and not all(bool(torch.isfinite(image).all()) for image in out[:n]):  # image by image: no big temporaries
        return _padim_features(det, arrays_or_paths, features)
    return out[:n]


def _all_images_statistics(det: PadimDetector, model: PadimModel, images: Sequence,
                           features: FeatureFn) -> PatchGaussianAccumulator:
    """The statistics of every training image: read back from the final model's factors where they can be
    (the model was fitted on exactly these images, and shrinkage < 1 keeps each position's own covariance
    recoverable), else summed again over a backbone pass."""
    if det.n_train_ == len(images) and det.shrinkage < 1.0 and det.n_train_ >= 2:
        return FactorStatistics(model.mean, model.inv_chol, len(images), det.epsilon, det.shrinkage)
    total = PatchGaussianAccumulator(*model.mean.shape)
    for z in det.embeddings(images, what="padim: validation", features=features):
        total.update(z)
    return total


def _padim_fold(det: PadimDetector, images: Sequence, held: np.ndarray, total: PatchGaussianAccumulator,
                features: FeatureFn, seed: int, synthetic: bool, kinds: Sequence[str], start: int, measure: bool
                ) -> tuple[list[SyntheticDefect], torch.Tensor, float | None]:
    """One fold: (its synthetic defects, the patch distances (normals first) under every image's statistics
    minus the fold's, unscaled, and with ``measure`` the growth c measured on this fold).

    The fold's float images go once their features and defects are made, and freed memory is handed back
    before the distances: the defects' backbone pass is train's peak, and each fold's leftovers (images, maps)
    sat under the next one's (PaDiM train on bottle: docs/benchmarks.md)."""
    arrays = at_model_size(det, [images[int(i)] for i in held])
    made = _defects_for(arrays, held, seed, synthetic, kinds, start)
    z = _padim_features(det, arrays, features)
    del arrays
    release_free_memory()  # each backbone pass's freed activations, before the next pass and the distances
    z_made = _padim_features(det, [d.image for d in made], features, half=True) if made else z[:0]
    release_free_memory()
    with torch.inference_mode():  # the fold's model: every image's sums minus the fold's own
        distances = torch.cat(total.distances_without(z, det.epsilon, z, z_made, shrinkage=det.shrinkage))
        growth = total.growth(z, distances, det.epsilon, shrinkage=det.shrinkage) if measure else None
    return made, distances, growth


def _padim_exact(det: Detector, images: Sequence, folds: np.ndarray, seed: int, synthetic: bool,
                 kinds: Sequence[str]) -> OutOfFold:
    det._check_fitted()
    if not isinstance(det, PadimDetector):
        raise InsightADError(f"validation: kfold-exact for padim needs a PadimDetector, got {type(det).__name__}")
    model = det._model_as(PadimModel)
    features = det._feature_runner(model.extractor)  # one engine session for every pass below
    fold_list = sorted(set(folds.tolist()))
    total = _all_images_statistics(det, model, images, features)
    gathered = _Folds()
    c: float | None = None  # how fast distances grow as the images get fewer, measured on the first fold
    factor = 1.0
    for f in fold_list:  # pass 2: each fold's model = total minus the fold
        release_free_memory()  # glibc keeps the last fold's freed features and temporaries resident under this one
        held = np.flatnonzero(folds == f)
        made, distances, growth = _padim_fold(det, images, held, total, features, seed + 101 * f, synthetic, kinds,
                                              f * len(held), c is None)
        if c is None:
            c = growth or 0.0
        factor = sample_size_factor(total.n, total.n - len(held), c)  # fold models see fewer images
        with torch.inference_mode():
            distances *= factor
            s_t, maps_t = model.score_distances(distances.to(getattr(det, "device_", "cpu")))
        del distances
        gathered.add(held, made, s_t.cpu().double().numpy(), maps_t.float().cpu().numpy())
        del s_t, maps_t, made  # not alive under the next fold's backbone pass
    out = gathered.result()
    out.size_correction = {"effective_c": round(float(c or 0.0), 2), "last_fold_factor": round(factor, 4)}
    return out


# ------------------------------------------------------------------------------ the decision
def untried_kinds(made: Sequence[str]) -> list[str]:
    """The synthetic defect kinds (``DEFECT_KINDS``) the validation never made."""
    seen = set(made)
    return [k for k in DEFECT_KINDS if k not in seen]


def untried_note(made: Sequence[str], n_normal: int) -> str:
    """The warning that only some defect kinds were tried: with one synthetic defect per validation normal, a few
    normals make a few kinds, and the recall per kind and the train report's examples showed those as if they
    were the whole picture."""
    untried = untried_kinds(made)
    tried = [k for k in DEFECT_KINDS if k not in untried]
    return (f"only {len(made)} synthetic defects ({', '.join(tried) or 'none'}) on {n_normal} validation normals: "
            f"{', '.join(untried)} never tried, so the recall says nothing about them (train on more "
            "normal images)")


def validate_and_decide(det: Detector, images: Sequence, strategy: str = "fpr",
                        max_false_alarms: float = DEFAULT_MAX_FALSE_ALARMS, folds: int = DEFAULT_FOLDS,
                        seed: int = 0, refit_folds: str = "one") -> tuple[OutOfFold, DecisionRecord]:
    """Out-of-fold scores of the training normals and synthetic defects -> ``det``'s threshold, with
    the false-alarm rate and synthetic recall expected at it recorded in ``threshold_info_``.

    The out-of-fold normal scores become ``decision_scores_``; the scale of ``score_normalized`` is
    their spread. The previous (in-method) threshold is kept under ``method_default``.
    """
    oof = out_of_fold(det, images, k=folds, seed=seed, refit_folds=refit_folds)
    masks = [d.mask for d in oof.defects] if oof.defect_maps is not None else None
    rec = decide(strategy, oof.normal_scores, oof.defect_scores, oof.defect_kinds,
                 max_false_alarms=max_false_alarms, percentile=float(getattr(det, "threshold_percentile", 99.0)),
                 synthetic_maps=oof.defect_maps, synthetic_masks=masks, validation=oof.scheme)
    n = len(oof.normal_scores)
    if n < MIN_VALIDATION_NORMALS:
        rec.warnings.insert(0, f"the validation set is small ({n} normal images scored out of fold): the expected "
                               "false-alarm rate and recall are rough (train on more normal images)")
    if untried_kinds(oof.defect_kinds):
        rec.warnings.append(untried_note(oof.defect_kinds, n))
    previous = {"value": getattr(det, "threshold_", None), "strategy": getattr(det, "threshold_strategy_", None)}
    det.decision_scores_ = oof.normal_scores
    det.validation_ = oof  # for the train report; not saved in the model file
    details = {"decision": rec.to_dict(), "scale": robust_scale(oof.normal_scores, rec.threshold),
               "n": n, "method_default": previous, "validation_seconds": round(oof.seconds, 3)}
    if rec.pixel_threshold is not None:
        details["pixel_threshold"] = rec.pixel_threshold
    if oof.size_correction is not None:
        details["fold_size_correction"] = oof.size_correction
    det.set_threshold(rec.threshold, f"oof_{strategy}", **details)
    return oof, rec
