"""PaDiM on synthetic data: maps find the defects, the streaming fit is exact, model files round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insightad.config import DataParams
from insightad.data.layouts import discover
from insightad.errors import InsightADError
from insightad.methods import create_detector
from insightad.methods.components.patch_gaussian import (
    FactorStatistics,
    PatchGaussianAccumulator,
    lower_triangular_inverse,
)
from insightad.methods.padim import level_patches
from tests.conftest import SIZE


@pytest.fixture(scope="module")
def padim(mvtec_dir):
    from insightad.apps.train import train_model

    det, path, _ = train_model(mvtec_dir, "padim", {"image_size": SIZE, "n_features": 48}, DataParams(),
                               mvtec_dir.parent / "padim.safetensors", progress=False)
    return det, path


def test_maps_light_up_on_defects(padim, mvtec_dir):
    from insightad.evaluate.run import evaluate_model

    det, _ = padim
    ev = evaluate_model(det, mvtec_dir, DataParams(), progress=False)
    assert ev.metrics["pixel_auroc"] > 0.85, ev.metrics
    assert ev.metrics["aupro"] > 0.5, ev.metrics
    assert ev.metrics["image_auroc"] > 0.8, ev.metrics
    assert ev.prediction.maps[0].shape == (256, 256)  # evaluation keeps maps at the metrics' resolution
    m = det.predict([ev.samples[0].path]).maps[0]
    assert m.shape == (96, 96) and m.dtype == np.float32  # predict: each map at its image's own resolution
    assert det.threshold_strategy_ == "holdout_p99" and det.threshold_info_["n"] == 3
    assert np.isfinite(det.threshold_) and det.threshold_ > 0


def test_streaming_sums_equal_one_shot_statistics():
    """Features with a large common offset (where naive float32 sums lose the covariance)."""
    g = torch.Generator().manual_seed(0)
    x = 50.0 + torch.randn(23, 6, 5, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, 5, dtype=torch.float64)
    acc = PatchGaussianAccumulator(6, 5)
    for part in x.float().split([1, 7, 0, 15]):
        acc.update(part)
    d = acc.distances(x[:3].float(), 0.01, chunk=4)
    mean, inv = acc.finalize(0.01, chunk=4)
    ref_cov = torch.stack([torch.cov(x[:, p].T) for p in range(6)]) + 0.01 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(mean.double(), x.mean(0), rtol=0, atol=1e-4)
    ref_inv = torch.linalg.inv(torch.linalg.cholesky(ref_cov))
    torch.testing.assert_close(inv.double(), ref_inv, rtol=2e-3, atol=2e-3)
    y = x[:3] - x.mean(0)
    ref_d = torch.einsum("pij,bpj->bpi", ref_inv, y).norm(dim=2)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"expected \(B, 6, 5\)"):
        PatchGaussianAccumulator(6, 5).update(torch.zeros(2, 6, 4))


def test_distances_without_some_images_equal_a_model_fitted_without_them():
    """Cross-fitting: the sums of all images minus a fold's give the fold-free model, chunk by chunk."""
    g = torch.Generator().manual_seed(1)
    x = 20.0 + torch.randn(30, 7, 4, generator=g)
    acc = PatchGaussianAccumulator(7, 4)
    acc.update(x)
    rest = PatchGaussianAccumulator(7, 4)
    rest.update(x[6:])
    q = torch.randn(5, 7, 4, generator=g) + 20.0
    got, also = acc.distances_without(x[:6], 0.01, q, q[:2], chunk=3)
    torch.testing.assert_close(got, rest.distances(q, 0.01), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(also, got[:2])
    torch.testing.assert_close(acc.distances_without(x[:0], 0.01, q)[0], acc.distances(q, 0.01))
    assert acc.n == 30  # unchanged


def test_shrinkage_towards_the_mean_covariance_matches_the_textbook_estimate():
    """(1 - a) cov_p + a mean_p(cov_p) + eps I per position: in finalize, in streamed distances, and in the
    fold-free model of cross-fitting (whose mean covariance is over the remaining images only)."""
    g = torch.Generator().manual_seed(2)
    x = 10.0 + torch.randn(25, 6, 4, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, 6,
                                                                                       dtype=torch.float64)[:, None]
    a, eps = 0.3, 0.01

    def reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cov = torch.stack([torch.cov(rows[:, p].T) for p in range(rows.shape[1])])
        shrunk = (1 - a) * cov + a * cov.mean(0) + eps * torch.eye(4, dtype=torch.float64)
        return rows.mean(0), torch.linalg.inv(torch.linalg.cholesky(shrunk))

    def dist(mean: torch.Tensor, inv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pij,bpj->bpi", inv, q.double() - mean).norm(dim=2)

    acc = PatchGaussianAccumulator(6, 4)
    acc.update(x.float())
    q = x[:3].float() + torch.randn(3, 6, 4, generator=g)
    mean, inv = reference(x)
    torch.testing.assert_close(acc.distances(q, eps, chunk=4, shrinkage=a).double(), dist(mean, inv, q),
                               rtol=1e-3, atol=1e-3)
    assert not torch.allclose(acc.distances(q, eps), acc.distances(q, eps, shrinkage=a))  # it does something
    rest_mean, rest_inv = reference(x[5:])
    got = acc.distances_without(x[:5].float(), eps, q, chunk=4, shrinkage=a)[0]
    torch.testing.assert_close(got.double(), dist(rest_mean, rest_inv, q), rtol=1e-3, atol=1e-3)
    m, factors = acc.finalize(eps, chunk=4, shrinkage=a)
    torch.testing.assert_close(factors.double(), inv, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("a", [0.0, 0.3])
def test_statistics_read_back_from_the_factors_give_the_same_fold_free_models(a):
    """Cross-fitting from a final model's factors (no second buffer, no second backbone pass) gives the
    distances of the models fitted without each fold, as the sums themselves do."""
    g = torch.Generator().manual_seed(3)
    x = 10.0 + torch.randn(40, 6, 4, generator=g) * torch.linspace(0.5, 3.0, 6)[:, None]
    eps = 0.01
    acc = PatchGaussianAccumulator(6, 4)
    acc.update(x)
    q = x[:3] + torch.randn(3, 6, 4, generator=g)
    want = acc.distances_without(x[:8], eps, q, chunk=4, shrinkage=a)[0]
    want_pooled = acc.pooled_covariance(x[:8])
    mean, factors = acc.finalize(eps, chunk=4, shrinkage=a)
    back = FactorStatistics(mean, factors, 40, eps, shrinkage=a, chunk=4)
    torch.testing.assert_close(back.pooled_covariance(x[:8]), want_pooled, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(back.distances_without(x[:8], eps, q, chunk=4, shrinkage=a)[0], want,
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(back.distances(q, eps, shrinkage=a),
                               torch.einsum("pij,bpj->bpi", factors, q - mean).norm(dim=2), rtol=1e-3, atol=1e-3)
    with pytest.raises(InsightADError, match="cannot take more images"):
        back.update(x[:1])
    with pytest.raises(InsightADError, match="shrinkage"):
        FactorStatistics(mean, factors, 40, eps, shrinkage=1.0)


def test_top_mean_image_score():
    from insightad.methods.components.maps import top_mean

    maps = torch.tensor([[[1.0, 5.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 4.0]]])
    torch.testing.assert_close(top_mean(maps, 0.0), torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(top_mean(maps, 0.5), torch.tensor([4.0, 2.0]))  # the top 2 of 4 pixels
    torch.testing.assert_close(top_mean(maps, 1.0), maps.flatten(1).mean(1))
    torch.testing.assert_close(top_mean(maps, 0.1), torch.tensor([5.0, 4.0]))  # at least one pixel


def test_block_triangular_inverse():
    a = torch.randn(3, 37, 37, dtype=torch.float64)
    low = torch.linalg.cholesky(a @ a.mT + 37 * torch.eye(37, dtype=torch.float64))
    torch.testing.assert_close(lower_triangular_inverse(low), torch.linalg.inv(low))


def test_streamed_fit_equals_one_shot_fit(mvtec_dir):
    """Batches of 4 and one batch of all images give the same model."""
    train = [s.path for s in discover(mvtec_dir).train][:12]
    kw = {"image_size": SIZE, "n_features": 32, "threshold_holdout": 0.25, "workers": 0, "shrinkage": 0.0}
    small = create_detector("padim", batch_size=4, **kw).fit(train)
    whole = create_detector("padim", batch_size=64, **kw).fit(train)
    torch.testing.assert_close(small.model_.mean, whole.model_.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small.model_.inv_chol, whole.model_.inv_chol, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(small.decision_scores_, whole.decision_scores_, rtol=1e-4)
    # The one-shot reference: every image's features at once, textbook covariance per position.
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([whole.preprocessing_.load(p)[0] for p in train]))
        model = whole.model_
        z = model.reduce(level_patches(model.extractor(model.normalize(x)))).double()
    np.testing.assert_allclose(whole.model_.mean.numpy(), z.mean(0).numpy(), rtol=1e-4, atol=1e-4)
    cov = torch.stack([torch.cov(z[:, p].T) for p in range(0, z.shape[1], 37)]) + 0.01 * torch.eye(32, dtype=torch.float64)
    ref = torch.linalg.inv(torch.linalg.cholesky(cov)).float()
    torch.testing.assert_close(whole.model_.inv_chol[::37], ref, rtol=1e-3, atol=2e-3)


def test_model_file_round_trips_to_identical_scores(padim, mvtec_dir):
    from insightad.model_file import load_model

    det, path = padim
    test = [s.path for s in discover(mvtec_dir).test][:6]
    before = det.predict(test)
    after = load_model(path).predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps[2], after.maps[2])
    assert after.threshold == det.threshold_


def test_pca_reduction(mvtec_dir):
    train = [s.path for s in discover(mvtec_dir).train][:10]
    det = create_detector("padim", image_size=SIZE, reduction="pca", n_features=16, pca_images=4,
                          batch_size=3, workers=0).fit(train)
    proj = det.model_.projection
    assert proj.shape == (176, 16)
    torch.testing.assert_close(proj.T @ proj, torch.eye(16), atol=1e-4, rtol=0)  # orthonormal components
    assert np.isfinite(det.predict(train[:2]).scores).all()


@pytest.mark.parametrize("params, message", [
    ({"reduction": "svd"}, "reduction: expected one of random, pca, none, got 'svd'"),
    ({"epsilon": 0.0}, "epsilon: expected a value > 0.0"),
    ({"n_features": 0}, "n_features: expected a value >= 1"),
    ({"threshold_holdout": 0.8}, "threshold_holdout: expected a value <= 0.5"),
    ({"layers": [1, 9]}, "layers: [1, 9] not available for tf_efficientnet_lite0"),
    ({"n_features": 500}, "n_features: 500 exceeds the 176 channels of layers [1, 2, 3]"),
])
def test_bad_parameters_are_named(mvtec_dir, params, message):
    train = [s.path for s in discover(mvtec_dir).train][:2]
    with pytest.raises(InsightADError) as e:
        create_detector("padim", image_size=SIZE, **params).fit(train)
    assert message in str(e.value)


def test_embed_into_fills_the_callers_buffer_with_the_embeddings(padim, mvtec_dir):
    """Cross-fitting's features go straight into its fold buffer, equal to the batch-by-batch embeddings, across
    several batches and with the rows the caller did not fill left alone."""
    det, _ = padim
    det.batch_size = 3
    paths = [s.path for s in discover(mvtec_dir).train][:7]
    want = torch.cat(list(det.embeddings(paths)))
    out = torch.full((9, *want.shape[1:]), -1.0)
    assert det.embed_into(paths, out) == 7
    torch.testing.assert_close(out[:7], want)
    assert bool((out[7:] == -1.0).all())
