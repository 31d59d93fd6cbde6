"""PaDiM's training memory savings keep the numbers: channels selected before upsampling, statistics updated a
chunk of positions at a time, cross-fitting's synthetic defects' features at half precision (full precision
where they would overflow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import SIZE


def _levels(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 24, 16, 16, generator=g), torch.randn(batch, 40, 8, 8, generator=g),
            torch.randn(batch, 112, 4, 4, generator=g)]


def test_selected_channels_give_the_projections_features():
    from insightad.methods.padim import level_patches, pca_projection, random_projection, selected_channels

    feats = _levels()
    proj, centre = random_projection(176, 120, seed=3), torch.zeros(176)
    kept = selected_channels(centre, proj, [24, 40, 112])
    assert kept is not None and len(kept) == 3 and sum(int(k.numel()) for k in kept) == 120
    want = (level_patches(feats) - centre) @ proj
    got = level_patches([f.index_select(1, k) for f, k in zip(feats, kept)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # no reduction: every channel, in order
    assert selected_channels(centre, torch.eye(176), [24, 40, 112]) is not None
    # projections that do more than select: PCA, a shifted centre, a scaled or reordered selection
    c, p = pca_projection(level_patches(feats).flatten(0, 1), 16)
    assert selected_channels(c, p, [24, 40, 112]) is None
    assert selected_channels(torch.ones(176), proj, [24, 40, 112]) is None
    assert selected_channels(centre, 2 * proj, [24, 40, 112]) is None
    assert selected_channels(centre, torch.eye(176)[:, [5, 2]], [24, 40, 112]) is None


def test_statistics_updated_by_chunks_of_positions_equal_the_direct_estimate():
    from insightad.methods.components.patch_gaussian import CHUNK, PatchGaussianAccumulator

    positions, dim = CHUNK * 2 + 7, 5  # a last chunk shorter than the others
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, positions, dim, generator=g) * 3 + 10
    acc = PatchGaussianAccumulator(positions, dim)
    for part in (z[:13], z[13:14], z[14:]):
        acc.update(part)
    x = z.double().numpy()
    np.testing.assert_allclose(acc.mean().numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
    for p in (0, CHUNK, positions - 1):
        np.testing.assert_allclose(acc.covariance(0.0, p, p + 1)[0].numpy(), np.cov(x[:, p].T), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fitted_padim(mvtec_dir):
    from insightad.data.layouts import discover
    from insightad.methods import create_detector

    paths = [s.path for s in discover(mvtec_dir).train][:6]
    return create_detector("padim", image_size=SIZE, n_features=24, fit_engine="torch").fit(paths), paths


def test_fold_features_are_kept_at_half_precision(fitted_padim):
    from insightad.methods.crossfit import _padim_features, at_model_size

    det, paths = fitted_padim
    arrays = at_model_size(det, paths[:3])
    features = det._feature_runner(det.model_.extractor)
    half = _padim_features(det, arrays, features, half=True)
    full = torch.cat(list(det.embeddings(arrays)))
    assert half.dtype == torch.float16 and half.shape == full.shape
    torch.testing.assert_close(half.float(), full, rtol=1e-3, atol=1e-3)


def test_fold_features_beyond_half_precision_are_taken_at_full_precision(fitted_padim, monkeypatch):
    from insightad.methods.crossfit import _padim_features, at_model_size

    det, paths = fitted_padim
    arrays = at_model_size(det, paths[:2])
    embed = type(det).embed_into

    def large(self, images, out, *args, **kwargs):  # a backbone whose activations reach 1e6
        n = embed(self, images, out, *args, **kwargs)
        out[:n] = 1e6  # inf at half precision
        return n

    monkeypatch.setattr(type(det), "embed_into", large)
    got = _padim_features(det, arrays, det._feature_runner(det.model_.extractor), half=True)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all()) and float(got.max()) == 1e6
