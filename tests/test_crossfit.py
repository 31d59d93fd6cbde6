"""Synthetic defects on the user's own normals (deterministic, exact masks) and out-of-fold scores."""

from __future__ import annotations

import numpy as np
import pytest

from insightad.data.defects import DEFECT_KINDS, make_defects
from insightad.data.synthetic import TOLERANCE, make_image
from insightad.errors import InsightADError
from tests.conftest import SIZE


def _normals(n=6, size=64, kind="disc"):
    return [np.asarray(make_image(kind, size=size, seed=i)[0]) for i in range(n)]


def test_defects_are_deterministic_and_masks_exact():
    normals = _normals()
    a = make_defects(normals, seed=4)
    b = make_defects(normals, seed=4)
    c = make_defects(normals, seed=5)
    assert [d.kind for d in a] == [d.kind for d in b] and sorted({d.kind for d in a}) == sorted(DEFECT_KINDS)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))
    for d in a:
        diff = np.abs(d.image.astype(int) - normals[d.source].astype(int)).max(-1)
        assert np.array_equal(d.mask, diff > TOLERANCE), d.kind  # exactly the changed pixels
        assert d.mask.sum() >= 12, d.kind


def test_defects_on_grey_images_and_bad_input():
    grey = [np.asarray(make_image("weave", size=48, seed=i, grayscale=True)[0]) for i in range(3)]
    out = make_defects(grey, seed=0, kinds=("crack", "texture"))
    assert all(d.image.shape == (48, 48) and d.image.dtype == np.uint8 for d in out)
    with pytest.raises(InsightADError, match="defect kinds"):
        make_defects(grey, kinds=("dent",))
    with pytest.raises(InsightADError, match="square uint8"):
        make_defects([np.zeros((40, 50, 3), np.uint8)] * 2)


def test_crossfitted_padim_equals_models_fitted_without_each_fold(mvtec_dir):
    from insightad.data.layouts import discover
    from insightad.methods import create_detector
    from insightad.methods.components.patch_gaussian import sample_size_factor
    from insightad.methods.crossfit import at_model_size, fold_ids, out_of_fold

    paths = [s.path for s in discover(mvtec_dir).train][:12]
    params = {"image_size": SIZE, "n_features": 24, "fit_engine": "torch"}
    final = create_detector("padim", **params).fit(paths)
    oof = out_of_fold(final, paths, k=3, seed=0)
    assert oof.scheme.startswith("kfold-exact") and len(oof.normal_scores) == 12 and len(oof.defects) == 12
    folds = fold_ids(12, 3, 0)
    for f in (2,):
        held = np.flatnonzero(folds == f)
        alone = create_detector("padim", **params).fit([p for i, p in enumerate(paths) if folds[i] != f])
        want = alone.predict(at_model_size(alone, [paths[i] for i in held]), maps=False).scores
        # ... on the final model's scale: fold models saw 8 images, the final one 12
        assert oof.size_correction is not None
        scale = sample_size_factor(12, 12 - len(held), oof.size_correction["effective_c"])
        assert scale < 1.0
        np.testing.assert_allclose(oof.normal_scores[np.isin(oof.normal_index, held)], want * scale, rtol=2e-3)
    assert np.median(oof.defect_scores) > np.median(oof.normal_scores)
    # each synthetic defect's map is its own array: a view would keep its fold's whole map array alive (the
    # normals' maps too) until the decision is made, under cross-fitting's peak memory
    assert oof.defect_maps is not None and len(oof.defect_maps) == 12
    assert all(m.base is None for m in oof.defect_maps)


def test_heldout_fold_refit_equals_exact_baseline_folds(mvtec_dir):
    """Baseline's exact k-fold scores (one embedding pass, bank minus the fold) equal a refit without
    the fold (the held-out-fold scheme), for the fold's normals and the defects made on them."""
    from insightad.data.layouts import discover
    from insightad.methods import create_detector
    from insightad.methods.crossfit import out_of_fold

    paths = [s.path for s in discover(mvtec_dir).train][:15]
    final = create_detector("baseline", image_size=SIZE, fit_engine="torch").fit(paths)
    exact = out_of_fold(final, paths, k=5, seed=0)
    held = out_of_fold(final, paths, k=5, seed=0, scheme="heldout-fold")
    assert exact.scheme == "kfold-exact (k=5)" and len(exact.normal_scores) == 15
    assert held.scheme == "heldout-fold (k=5)" and len(held.normal_scores) == 3 and len(held.defect_scores) == 3
    same = np.isin(exact.normal_index, held.normal_index)
    np.testing.assert_allclose(exact.normal_scores[same], held.normal_scores, rtol=1e-4)
    first = [i for i, d in enumerate(exact.defects) if d.source in set(held.normal_index.tolist())]
    np.testing.assert_allclose(exact.defect_scores[first], held.defect_scores, rtol=1e-4)
    assert exact.defect_maps is None


def test_validation_keeps_defect_images_for_the_report_examples_only(mvtec_dir, tmp_path):
    """Every fold's synthetic defect images were kept to the end (40 MB on bottle, under the last fold's
    peak); only the first EXAMPLE_IMAGES of each kind keep theirs (the train report's example sheet), every
    defect keeps its mask and score, and the sheet is drawn from the kept ones."""
    from collections import Counter

    from insightad.apps.train_report import example_sheet
    from insightad.data.layouts import discover
    from insightad.methods import create_detector
    from insightad.methods.crossfit import EXAMPLE_IMAGES, out_of_fold

    paths = [s.path for s in discover(mvtec_dir).train][:20]
    final = create_detector("baseline", image_size=SIZE, fit_engine="torch").fit(paths)
    oof = out_of_fold(final, paths, k=5, seed=0)
    kinds = Counter(d.kind for d in oof.defects)
    shown = Counter(d.kind for d in oof.defects if d.image.size)
    assert shown == {k: min(n, EXAMPLE_IMAGES) for k, n in kinds.items()}
    assert max(kinds.values()) > EXAMPLE_IMAGES  # some defects did lose their image
    assert all(d.mask.size for d in oof.defects) and len(oof.defect_scores) == len(oof.defects) == 20
    sheet = example_sheet(final, oof, tmp_path / "examples.png")
    assert sheet.is_file()


def test_patchcore_validation_scores_each_image_without_its_own_bank_patches(mvtec_dir):
    """bank-without-image: a training normal's out-of-fold score is exactly its score under the same model
    with that image's patches taken out of the bank, and every training normal is validated."""
    import copy

    import torch

    from insightad.data.layouts import discover
    from insightad.methods import create_detector
    from insightad.methods.crossfit import at_model_size, out_of_fold

    paths = [s.path for s in discover(mvtec_dir).train][:8]
    det = create_detector("patchcore", image_size=SIZE, coreset_ratio=0.5, search="exact", fit_engine="torch").fit(paths)
    oof = out_of_fold(det, paths, k=2, seed=0)
    assert oof.scheme.startswith("bank-without-image") and len(oof.normal_scores) == 8 and len(oof.defects) == 8
    assert sorted(oof.normal_index.tolist()) == list(range(8))
    for i in (2, 5):
        alone = copy.deepcopy(det)
        keep = det.bank_source_ != i
        assert not bool(keep.all())  # the image has patches in the bank
        alone.model_.bank = det.model_.bank[keep].clone()
        want = alone.predict(at_model_size(alone, [paths[i]]), maps=False).scores[0]
        got = oof.normal_scores[list(oof.normal_index).index(i)]
        assert got == pytest.approx(want, rel=1e-4)
        assert got > det.predict(at_model_size(det, [paths[i]]), maps=False).scores[0]  # in-sample is lower
    d = oof.defects[0]
    alone = copy.deepcopy(det)
    alone.model_.bank = det.model_.bank[det.bank_source_ != d.source].clone()
    assert oof.defect_scores[0] == pytest.approx(alone.predict([d.image.astype(np.float32)], maps=False).scores[0],
                                                 rel=1e-4)
    assert torch.equal(det.bank_source_, det.bank_source_.sort().values)  # in image order, like the bank


def test_patchcore_validation_with_a_one_image_bank_stays_finite():
    """A bank whose patches all come from one training image leaves nothing to compare that image with: it is
    scored in-sample (as the method's own default threshold does), not against an empty bank (NaN)."""
    from insightad.methods import create_detector
    from insightad.methods.crossfit import out_of_fold

    normals = _normals(n=4)
    det = create_detector("patchcore", image_size=SIZE, coreset_ratio=1e-6, search="exact",
                          fit_engine="torch").fit(normals)
    assert det.model_.bank.shape[0] == 1
    oof = out_of_fold(det, normals, k=2, seed=0)
    assert np.isfinite(oof.normal_scores).all() and np.isfinite(oof.defect_scores).all()


def test_sample_size_factor_puts_fold_distances_on_the_final_models_scale():
    """Gaussian data: new points' squared Mahalanobis distances under a covariance from fewer images,
    times the factor squared, match those under the covariance from more images (within 5%)."""
    from insightad.methods.components.patch_gaussian import sample_size_factor

    rng = np.random.default_rng(0)
    d, n_full, n_fold = 12, 60, 45

    def mean_sq(m: int) -> float:
        out = []
        for _ in range(200):
            x = rng.standard_normal((m, d))
            inv = np.linalg.inv(np.cov(x, rowvar=False))
            y = rng.standard_normal((50, d)) - x.mean(0)
            out.append(np.einsum("ij,jk,ik->i", y, inv, y).mean())
        return float(np.mean(out))

    f = sample_size_factor(n_full, n_fold, d + 2)
    assert 0.7 < f < 1.0
    assert abs(mean_sq(n_fold) * f**2 / mean_sq(n_full) - 1) < 0.05
    assert sample_size_factor(100, 10, d + 2) == 1.0  # the formula needs more images than dimensions + 2


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_measured_growth_puts_out_of_fold_distances_on_new_points_scale(shrinkage):
    """Per-position Gaussians, plain or shrunk: out-of-fold distances times the factor from the growth
    measured on one fold have the mean square of new points' distances under the model of all images;
    the factor from d+2 (Hotelling, no shrinkage) is right only without shrinkage."""
    import torch

    from insightad.methods.components.patch_gaussian import PatchGaussianAccumulator, sample_size_factor

    g = torch.Generator().manual_seed(0)
    positions, d, n, k, eps = 64, 10, 30, 5, 1e-3
    mix = torch.randn(positions, d, d, generator=g) / d**0.5 + torch.eye(d)  # each position its own covariance

    def draw(m: int) -> torch.Tensor:
        return torch.einsum("pij,mpj->mpi", mix, torch.randn(m, positions, d, generator=g))

    z = draw(n)
    acc = PatchGaussianAccumulator(positions, d)
    acc.update(z)
    new = acc.distances_without(z[:0], eps, draw(2000), shrinkage=shrinkage)[0]
    folds = torch.arange(n) % k
    c = None
    oof = []
    for f in range(k):
        part = z[folds == f]
        dist = acc.distances_without(part, eps, part, shrinkage=shrinkage)[0]
        c = acc.growth(part, dist, eps, shrinkage=shrinkage) if c is None else c
        oof.append(dist * sample_size_factor(n, n - len(part), c))
    ratio = float(torch.cat(oof).square().mean() / new.square().mean())
    hotelling = float(torch.cat([o / sample_size_factor(n, n - n // k, c) * sample_size_factor(n, n - n // k, d + 2)
                                 for o in oof]).square().mean() / new.square().mean())
    assert abs(ratio - 1) < 0.06, (c, ratio, hotelling)
    if shrinkage == 0:
        assert abs(c - (d + 2)) < 4 and abs(hotelling - 1) < 0.06
    else:
        assert c < d and hotelling < 0.92  # d+2 would put the threshold far below new normals
