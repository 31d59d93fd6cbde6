"""The baseline detector: contract (fit returns self, higher = more anomalous), both scorers, threshold."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from insightad.data import discover
from insightad.errors import InsightADError
from insightad.methods import create_detector, list_methods
from tests.conftest import SIZE


@pytest.fixture(scope="module")
def data(mvtec_dir):
    ds = discover(mvtec_dir)
    return [s.path for s in ds.train], [s.path for s in ds.test], np.array([s.label for s in ds.test])


@pytest.mark.parametrize("scorer", ["knn", "gaussian"])
def test_defects_score_higher(data, scorer):
    train, test, labels = data
    det = create_detector("baseline", image_size=SIZE, scorer=scorer)
    assert det.fit(train) is det
    assert det.threshold_ > 0 and det.threshold_strategy_.startswith("train_loo")
    pred = det.predict(test)
    assert pred.maps is None and pred.labels.dtype == bool and len(pred) == len(test)
    assert roc_auc_score(labels, pred.scores) > 0.8


def test_contract_and_params():
    det = create_detector("baseline", k=5, image_size=SIZE)
    assert det.get_params()["k"] == 5 and not det.is_fitted
    assert "baseline" in list_methods()
    with pytest.raises(InsightADError, match="not fitted"):
        det.predict([np.zeros((8, 8, 3), np.uint8)])
    assert det.set_params(k=2).k == 2
    assert "k=2" in repr(det)


@pytest.mark.parametrize("bad,msg", [({"k": 0}, "k: expected a value >= 1"),
                                     ({"scorer": "svm"}, "scorer: expected one of knn, gaussian"),
                                     ({"batch_size": 0}, "batch_size: expected a value >= 1"),
                                     ({"image_size": "big"}, "image_size: expected a number"),
                                     ({"nope": 1}, "unknown setting 'nope'")])
def test_bad_hyperparameters(bad, msg):
    with pytest.raises(InsightADError, match=msg):
        create_detector("baseline", **bad)


def test_unknown_method():
    with pytest.raises(InsightADError, match="unknown method 'magic'"):
        create_detector("magic")


def test_predict_accepts_arrays_pil_and_grayscale(data):
    from PIL import Image

    train, _, _ = data
    det = create_detector("baseline", image_size=SIZE).fit(train[:10])
    arr = np.asarray(Image.open(train[0]).convert("L"))
    pred = det.predict([arr, Image.open(train[1]), train[2]])
    assert np.isfinite(pred.scores).all()


def test_non_strict_predict_marks_unreadable(data, tmp_path):
    train, _, _ = data
    det = create_detector("baseline", image_size=SIZE).fit(train[:10])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    pred = det.predict([train[0], bad, train[1]], strict=False)
    assert np.isnan(pred.scores[1]) and 1 in pred.errors and "bad.png" in pred.errors[1]
    assert np.isfinite(pred.scores[[0, 2]]).all() and not pred.labels[1]
    with pytest.raises(InsightADError, match="bad.png"):
        det.predict([train[0], bad])


def test_fit_is_deterministic(data):
    train, test, _ = data
    a = create_detector("baseline", image_size=SIZE).fit(train[:12]).predict(test[:4]).scores
    b = create_detector("baseline", image_size=SIZE).fit(train[:12]).predict(test[:4]).scores
    np.testing.assert_array_equal(a, b)


def test_model_files_from_before_pooling_score_as_they_did(data, tmp_path):
    """A file written with the old defaults (levels 2-4, kNN, mean pooling, no 'pooling' key) still
    loads with mean pooling and gives the same scores."""
    import json

    from safetensors.torch import load_file, save_file

    from insightad.model_file import META_KEY, load_model, read_metadata, save_model

    train, test, _ = data
    det = create_detector("baseline", image_size=SIZE, layers=[2, 3, 4], scorer="knn", pooling="mean").fit(train)
    path = save_model(det, tmp_path / "new.safetensors")
    meta = read_metadata(path)
    del meta["params"]["pooling"], meta["content_sha256"]  # as written before either existed
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={META_KEY: json.dumps(meta)})
    back = load_model(old)
    assert back.pooling == "mean"
    np.testing.assert_allclose(back.predict(test[:4]).scores, det.predict(test[:4]).scores, rtol=1e-6)


def test_region_pooling_matches_pooling_each_region():
    """A grid's region embeddings are the whole-image pooling of each region's cells, on every level, row by
    row; where the grid does not divide a level, each cell counts in proportion to how much of it lies in the
    region (its cells repeated until the side divides); grid 1 is the whole image."""
    import math

    import torch

    from insightad.methods.components.pooling import pool, pool_regions

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 12, 12, generator=g), torch.randn(2, 6, 6, 6, generator=g),
             torch.randn(2, 5, 3, 3, generator=g)]
    assert torch.allclose(pool_regions(feats, "mean_std_max", 1)[:, 0], pool(feats, "mean_std_max"))
    for grid in (2, 3, 4):  # 4 divides 12 but neither 6 nor 3
        got = pool_regions(feats, "mean_std_max", grid)
        assert got.shape == (2, grid * grid, 3 * (4 + 6 + 5))
        for r in range(grid * grid):
            i, j = divmod(r, grid)
            cells = []
            for f in feats:
                k = grid // math.gcd(f.shape[2], grid)
                up = f.repeat_interleave(k, 2).repeat_interleave(k, 3)
                side = up.shape[2] // grid
                cells.append(up[:, :, i * side:(i + 1) * side, j * side:(j + 1) * side])
            assert torch.allclose(got[:, r], pool(cells, "mean_std_max"), atol=1e-6), (grid, r)


@pytest.mark.parametrize("scorer", ["knn", "gaussian"])
def test_grid_scores_each_region_and_keeps_the_farthest(data, scorer):
    """With a grid, the image score is the largest region distance under one model of all normal regions; the
    Gaussian scorer keeps no bank of training regions (mean and precision are all it needs)."""
    import torch

    from insightad.methods.baseline import BaselineModel, image_knn, image_mahalanobis

    train, test, labels = data
    det = create_detector("baseline", image_size=SIZE, scorer=scorer, grid=4, region_top=1).fit(train)
    model = det._model_as(BaselineModel)
    assert model.bank.shape[0] == (16 * len(train) if scorer == "knn" else 0)
    pred = det.predict(test)
    assert roc_auc_score(labels, pred.scores) > 0.8
    x = torch.from_numpy(np.stack([det.preprocessing_.load(p)[0] for p in test[:3]]))
    with torch.inference_mode():
        e = model.embed(x)
        per_region = (image_knn(e[:, :1], model.bank, det.k) if scorer == "knn" else
                      image_mahalanobis(e[:, :1], model.mean, model.precision))
        assert e.shape[1] == 16
        assert np.all(model(x)[0].numpy() >= per_region.numpy() - 1e-5)
    np.testing.assert_allclose(model(x)[0].numpy(), pred.scores[:3], rtol=1e-4)


@pytest.mark.parametrize("scorer", ["knn", "gaussian"])
def test_region_top_scores_the_mean_of_the_farthest_regions_and_round_trips(data, scorer, tmp_path):
    """region_top K: the image score is the mean of its K farthest regions' distances, in the model, its
    out-of-fold scores and its saved and reloaded file alike."""
    import torch

    from insightad.methods.baseline import BaselineDetector, BaselineModel, image_knn, image_mahalanobis
    from insightad.model_file import load_model, save_model

    train, test, _ = data
    det = create_detector("baseline", image_size=SIZE, scorer=scorer, grid=4, region_top=3).fit(train)
    model = det._model_as(BaselineModel)
    x = torch.from_numpy(np.stack([det.preprocessing_.load(p)[0] for p in test[:3]]))
    with torch.inference_mode():
        e = model.embed(x)
        each = torch.stack([image_knn(e[:, r:r + 1], model.bank, det.k) if scorer == "knn" else
                            image_mahalanobis(e[:, r:r + 1], model.mean, model.precision) for r in range(16)], 1)
    np.testing.assert_allclose(det.predict(test[:3]).scores, each.topk(3, dim=1).values.mean(1).numpy(), rtol=1e-4)
    farthest = create_detector("baseline", image_size=SIZE, scorer=scorer, grid=4, region_top=1).fit(train)
    assert np.all(farthest.decision_scores_ >= det.decision_scores_ - 1e-5)  # a mean of the top 3 <= the top one
    again = load_model(save_model(det, tmp_path / "top.safetensors"))
    assert again.region_top == 3 and BaselineDetector.legacy_params["region_top"] == 1  # older files: the farthest
    np.testing.assert_allclose(again.predict(test[:3]).scores, det.predict(test[:3]).scores, rtol=1e-5)
