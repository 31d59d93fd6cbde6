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
    del meta["params"]["pooling"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={META_KEY: json.dumps(meta)})
    back = load_model(old)
    assert back.pooling == "mean"
    np.testing.assert_allclose(back.predict(test[:4]).scores, det.predict(test[:4]).scores, rtol=1e-6)
