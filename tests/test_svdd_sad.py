"""Deep SAD (svdd --objective sad): its labelled anomalies are synthetic defects made deterministically on
the training normals, its loss pushes them away from c, and the detector trains on cached features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insightad.errors import InsightADError

SIZE = 64
TINY = {"image_size": SIZE, "backbone": "test_efficientnet", "weights": "random", "layers": [2, 3, 4],
        "patience": 0}


def _normals(n: int = 6, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    base = rng.integers(90, 160, (size, size, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_synthetic_anomalies_are_deterministic_with_the_seed():
    from insightad.methods.svdd import synthetic_anomalies

    normals = _normals()
    a = [d.image for d in synthetic_anomalies(normals, 2, ("crack", "blob", "cutpaste"), seed=3)]
    b = [d.image for d in synthetic_anomalies(normals, 2, ("crack", "blob", "cutpaste"), seed=3)]
    c = [d.image for d in synthetic_anomalies(normals, 2, ("crack", "blob", "cutpaste"), seed=4)]
    assert len(a) == 2 * len(normals) and all(x.shape == normals[0].shape and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    sources = [normals[i % len(normals)] for i in range(len(a))]
    assert all(not np.array_equal(x, s) for x, s in zip(a, sources))  # every one is a defect on its normal
    assert synthetic_anomalies([], 1, ("crack",), seed=0) == []


def test_sad_loss_is_one_class_on_normals_and_inverse_distance_on_anomalies():
    from insightad.methods.svdd import SAD_EPS, Hypersphere, SVDDObjective, with_labels

    head = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        head[0].weight.copy_(torch.eye(2))
    sphere = Hypersphere(head, torch.zeros(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    batch = torch.cat([with_labels(x[:1], 0.0), with_labels(x[1:], 1.0)])
    loss, metrics = SVDDObjective("sad", 0.1, 0, None, eta=3.0).loss(sphere, batch)
    assert float(loss.detach()) == pytest.approx((1.0 + 3.0 / (4.0 + SAD_EPS)) / 2)
    assert metrics["anomalies_inside"] == 0.0  # the anomaly (d^2 4) lies beyond the farthest normal (d^2 1)


def _train_toy(objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals and (shifted) anomalies in 16 dimensions; median distances to c after training a head."""
    from insightad.config import TrainLoopParams
    from insightad.methods.svdd import Hypersphere, SVDDObjective, fixed_center, projection_head, with_labels
    from insightad.training import TrainingLoop

    g = torch.Generator().manual_seed(0)
    normals = torch.randn(128, 16, generator=g)
    anomalies = torch.randn(128, 16, generator=g)
    anomalies[:, 0] += 1.5  # a modest shift along one direction the one-class loss has no reason to keep
    torch.manual_seed(0)
    sphere = Hypersphere(projection_head(16, [32], 8), torch.zeros(8))
    with torch.no_grad():
        sphere.center.copy_(fixed_center(sphere.head(normals), 0.1))
    labelled = torch.cat([with_labels(normals, 0.0), with_labels(anomalies, 1.0)])
    data = labelled if objective == "sad" else normals
    loop = TrainingLoop(TrainLoopParams(epochs=60, batch_size=32, lr=1e-3, patience=0, val_fraction=0.0,
                                        device="cpu", seed=0), name="toy")
    loop.run(sphere, SVDDObjective(objective, 0.1, 0, None, eta=1.0), data)
    with torch.no_grad():
        return sphere(normals), sphere(anomalies)


def test_sad_pushes_labelled_anomalies_farther_than_normals_on_a_toy_set():
    n_sad, a_sad = _train_toy("sad")
    n_one, a_one = _train_toy("one-class")
    sad_ratio = float(a_sad.median() / n_sad.median())
    one_ratio = float(a_one.median() / n_one.median())
    assert sad_ratio > 2.0 and sad_ratio > 1.5 * one_ratio, (sad_ratio, one_ratio)
    # separable by distance: most anomalies beyond the 90th percentile of the normals
    assert float((a_sad > torch.quantile(n_sad, 0.9)).float().mean()) > 0.8


@pytest.fixture(scope="module")
def sad_images(mvtec_dir):
    return sorted((mvtec_dir / "train" / "good").glob("*.png"))[:16]


def test_svdd_sad_fits_on_cached_features_and_is_deterministic(sad_images):
    from insightad.methods import create_detector

    params = {**TINY, "objective": "sad", "epochs": 4, "synthetic_anomalies": 2, "synthetic_kinds": ["crack", "blob"]}
    a = create_detector("svdd", **params).fit(sad_images)
    b = create_detector("svdd", **params).fit(sad_images)
    assert a.n_anomalies_ == 2 * len(sad_images)  # two per normal, training and validation splits together
    sa, sb = a.model_.sphere.state_dict(), b.model_.sphere.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert 0.0 <= a.training_.history[-1]["train_anomalies_inside"] <= 1.0  # the loop saw labelled anomalies
    assert len(a.decision_scores_) == len(sad_images) - len(a.train_scores_)  # validation normals only
    assert a.state_metadata()["synthetic_anomalies"] == 2 * len(sad_images)
    assert not hasattr(a, "_run_features")  # the fit's backbone runner is not kept


def test_svdd_sad_refuses_augmentation_and_bad_kinds(sad_images):
    from insightad.methods import create_detector

    with pytest.raises(InsightADError, match="objective sad trains on cached features"):
        create_detector("svdd", objective="sad", augment="affine", **TINY).fit(sad_images)
    with pytest.raises(InsightADError, match="synthetic_kinds: expected some of cutpaste"):
        create_detector("svdd", objective="sad", synthetic_kinds=["rust"], **{**TINY, "epochs": 1}).fit(sad_images)


def test_svdd_standardize_stores_the_normals_statistics_and_round_trips(sad_images, tmp_path):
    from insightad.methods import create_detector
    from insightad.model_file import load_model, save_model

    det = create_detector("svdd", standardize=True, heads=1, **{**TINY, "epochs": 3}).fit(sad_images)
    sphere = det.model_.sphere
    assert sphere.standardized and float(sphere.scale.min()) > 0
    feats = det.model_.features(torch.from_numpy(np.stack(
        [det.preprocessing_.load(p)[0] for p in sad_images])).float()).flatten(0, 1)  # every region's row
    live = feats.std(dim=0) > 0  # at 64 px a deep level's region is one repeated cell: its spread is always 0
    z = ((feats - sphere.shift) / sphere.scale)[:, live]  # the training split's normals: ~zero mean, unit spread
    assert float(z.mean(dim=0).abs().max()) < 1.0 and 0.5 < float(z.std(dim=0).median()) < 1.5
    again = load_model(save_model(det, tmp_path / "std.safetensors"))
    assert again.model_.sphere.standardized
    np.testing.assert_allclose(again.predict(sad_images[:4]).scores, det.predict(sad_images[:4]).scores,
                               rtol=1e-5, atol=1e-6)
    plain = create_detector("svdd", standardize=False, heads=1, **{**TINY, "epochs": 1}).fit(sad_images)  # no buffers
    assert not load_model(save_model(plain, tmp_path / "plain.safetensors")).model_.sphere.standardized


def test_svdd_heads_are_an_ensemble_of_spheres_on_a_median_scale_and_round_trip(sad_images, tmp_path):
    """heads=0 (default) trains three heads from their own initialisations; each member's distances are divided
    by its median over the validation normals and averaged; the ensemble saves, loads and exports as it scores.
    A file from before the setting is one head (legacy); soft-boundary keeps one head, and more is refused."""
    from insightad.inference.export import export_onnx
    from insightad.methods import create_detector
    from insightad.methods.svdd import SphereEnsemble, SVDDDetector, farthest_region, members
    from insightad.model_file import load_model, save_model

    assert SVDDDetector.legacy_params["heads"] == 1
    det = create_detector("svdd", **{**TINY, "epochs": 3}).fit(sad_images)
    sphere = det.model_.sphere
    assert isinstance(sphere, SphereEnsemble) and len(members(sphere)) == 3
    heads = [m.head[0].weight for m in members(sphere)]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])  # own initialisations
    val = [p for i, p in enumerate(sad_images) if i not in set(_train_index(det, len(sad_images)))]
    feats = det.model_.features(torch.from_numpy(np.stack([det.preprocessing_.load(p)[0] for p in val])).float())
    top = det.region_top  # the mean of each image's 4 farthest regions (default)
    with torch.no_grad():  # (images, regions, members): each member's image score has median 1 over them
        d = sphere.squared_distances(feats.flatten(0, 1)).sqrt().reshape(*feats.shape[:2], -1)
        torch.testing.assert_close(sphere.scales, d.topk(top, dim=1).values.mean(1).median(dim=0).values)
        torch.testing.assert_close(farthest_region(sphere, feats, top),
                                   (d / sphere.scales).mean(-1).topk(top, dim=1).values.mean(1))
    again = load_model(save_model(det, tmp_path / "heads.safetensors"))
    assert isinstance(again.model_.sphere, SphereEnsemble)
    np.testing.assert_allclose(again.predict(sad_images[:4]).scores, det.predict(sad_images[:4]).scores,
                               rtol=1e-5, atol=1e-6)
    export_onnx(det, tmp_path / "heads.onnx", "0" * 64)  # verified against PyTorch or raises
    one = create_detector("svdd", objective="soft-boundary", **{**TINY, "epochs": 1}).fit(sad_images)
    assert not isinstance(one.model_.sphere, SphereEnsemble)
    with pytest.raises(InsightADError, match="heads: objective soft-boundary trains one head"):
        create_detector("svdd", objective="soft-boundary", heads=2, **{**TINY, "epochs": 1}).fit(sad_images)


def _train_index(det, n: int) -> list[int]:
    from insightad.training import validation_split

    return validation_split(n, det.val_fraction, det.seed)[0].tolist()


def test_defect_regions_label_the_regions_a_mask_covers_and_not_its_slivers():
    from insightad.methods.components.pooling import region_coverage
    from insightad.methods.svdd import defect_regions

    mask = np.zeros((64, 64), bool)
    mask[2:14, 2:14] = True  # inside region (0, 0) of a 4 x 4 grid (16 px regions)
    mask[14:16, 16:30] = True  # a sliver in region (0, 1): 28 px against region (0, 0)'s 144
    cover = region_coverage(torch.from_numpy(np.stack([mask, np.ones_like(mask)])), 4)
    assert cover.shape == (2, 16) and float(cover[0, 0]) == pytest.approx(144 / 256)
    assert float(cover[0, 1]) == pytest.approx(28 / 256) and torch.all(cover[1] == 1.0)
    labels = defect_regions([mask, np.ones_like(mask)], 4)
    assert labels[0].nonzero().flatten().tolist() == [0]  # the sliver's region stays unlabelled
    assert bool(labels[1].all())  # a defect over the whole image labels every region


def test_svdd_grid_scores_the_farthest_region_and_round_trips_and_exports(sad_images, tmp_path):
    """With a grid, every region is pooled and mapped by the heads; the image's score is the mean of its 4 farthest
    regions' (default region_top), the labelled anomalies are the regions under the synthetic defects' masks; saved,
    loaded and exported alike. Files from before either setting score the whole image (grid 1, region_top 1)."""
    from insightad.inference.export import export_onnx
    from insightad.methods import create_detector
    from insightad.methods.svdd import SVDDDetector, members
    from insightad.model_file import load_model, save_model

    assert SVDDDetector.legacy_params["grid"] == 1 and SVDDDetector.legacy_params["region_top"] == 1
    det = create_detector("svdd", grid=4, **{**TINY, "epochs": 3}).fit(sad_images)
    x = torch.from_numpy(np.stack([det.preprocessing_.load(p)[0] for p in sad_images[:4]])).float()
    with torch.no_grad():
        regions = det.model_.features(x)
        per_region = det.model_.sphere(regions.flatten(0, 1)).reshape(4, 16)
    assert regions.shape[:2] == (4, 16)
    np.testing.assert_allclose(det.predict(sad_images[:4]).scores, per_region.topk(4, dim=1).values.mean(1).numpy(),
                               rtol=1e-5)
    assert det.n_anomalies_ == len(sad_images)  # one defect per normal, labelled by its regions
    again = load_model(save_model(det, tmp_path / "grid.safetensors"))
    assert again.grid == 4
    np.testing.assert_allclose(again.predict(sad_images[:4]).scores, det.predict(sad_images[:4]).scores,
                               rtol=1e-5, atol=1e-6)
    export_onnx(det, tmp_path / "grid.onnx", "0" * 64)  # verified against PyTorch or raises
    augmented = create_detector("svdd", grid=4, objective="one-class", augment="affine", standardize=True,
                                **{**TINY, "epochs": 2}).fit(sad_images)  # regions of augmented images, on the fly
    assert members(augmented.model_.sphere)[0].shift.shape == (regions.shape[-1],)
    assert augmented.predict(sad_images[:4]).scores.shape == (4,)


def test_svdd_region_top_scores_the_mean_of_the_farthest_regions_and_round_trips_and_exports(sad_images, tmp_path):
    """region_top K: the image score is the mean of its K farthest regions (the members' scales too); the setting
    is saved with the model and the exported graph computes the same (TopK)."""
    from insightad.inference.export import export_onnx
    from insightad.methods import create_detector
    from insightad.methods.svdd import per_image_top
    from insightad.model_file import load_model, save_model

    values = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 0.0, 4.0, 8.0]]).flatten()
    pooled = torch.zeros(2, 4, 7)
    assert per_image_top(values, pooled).tolist() == [5.0, 8.0]
    assert per_image_top(values, pooled, 2).tolist() == [4.0, 6.0]
    assert per_image_top(values, pooled, 9).tolist() == [2.75, 4.0]  # at most every region
    assert per_image_top(values[:2], pooled[:, 0], 3).tolist() == [1.0, 5.0]  # whole images: as they are

    det = create_detector("svdd", grid=4, region_top=3, **{**TINY, "epochs": 3}).fit(sad_images)
    x = torch.from_numpy(np.stack([det.preprocessing_.load(p)[0] for p in sad_images[:4]])).float()
    with torch.no_grad():
        per_region = det.model_.sphere(det.model_.features(x).flatten(0, 1)).reshape(4, 16)
    np.testing.assert_allclose(det.predict(sad_images[:4]).scores, per_region.topk(3, dim=1).values.mean(1).numpy(),
                               rtol=1e-5)
    again = load_model(save_model(det, tmp_path / "top.safetensors"))
    assert again.region_top == 3 and again.model_.top == 3
    np.testing.assert_allclose(again.predict(sad_images[:4]).scores, det.predict(sad_images[:4]).scores,
                               rtol=1e-5, atol=1e-6)
    export_onnx(det, tmp_path / "top.onnx", "0" * 64)  # verified against PyTorch or raises
