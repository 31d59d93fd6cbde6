"""The Detector contract, checked for every registered method the moment it registers.

scikit-learn's conventions (fit returns self, learned state ends in ``_``, ``clone`` works,
``get_params``/``set_params``), higher score = more anomalous on a synthetic defect, a model-file
round trip that scores identically, and PyTorch vs ONNX Runtime within 1e-4 relative.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from sklearn.base import clone

from insightad.data.synthetic import make_image
from insightad.errors import InsightADError
from insightad.methods import list_methods
from insightad.methods.registry import get_method

SIZE = 64
# Settings that keep each built-in method fast on 2 cores; a new method runs with its defaults at SIZE.
FAST: dict[str, dict] = {
    "baseline": {},
    "padim": {"n_features": 16},
    "patchcore": {"coreset_ratio": 0.2},
    "svdd": {"epochs": 15, "patience": 0, "val_fraction": 0.0},
    "autoencoder": {"epochs": 10, "batch_size": 8, "lr": 3e-3, "val_fraction": 0.0, "patience": 0, "latent": 16},
    "ensemble": {"members": ["baseline", "padim"]},  # members with their defaults: the fast ones
}
BUILT_IN = sorted(FAST)


def _params(method: str) -> dict:
    return {"image_size": SIZE, "device": "cpu", "workers": 0, **FAST.get(method, {})}


@pytest.fixture(scope="module")
def images():
    train = [make_image("plate", size=SIZE, seed=i)[0] for i in range(16)]
    normal = [make_image("plate", size=SIZE, seed=100 + i)[0] for i in range(4)]
    defective = [make_image("plate", "blob", size=SIZE, seed=200 + i)[0] for i in range(4)]
    return train, normal, defective


@pytest.fixture(scope="module", params=BUILT_IN + [m for m in list_methods() if m not in FAST])
def fitted(request, images):
    method = request.param
    det = get_method(method)(**_params(method))
    return method, det, det.fit(images[0])


def test_built_in_methods_are_registered():
    assert set(BUILT_IN) <= set(list_methods())


@pytest.mark.parametrize("method", BUILT_IN)
def test_constructor_is_explicit_and_clone_works(method):
    cls = get_method(method)
    sig = inspect.signature(cls)
    assert not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())  # no **params hiding the signature
    assert set(sig.parameters) == set(cls.param_names())
    det = cls(**_params(method))
    twin = clone(det)
    assert type(twin) is cls and twin is not det and twin.get_params() == det.get_params()
    assert det.get_params(deep=True) == det.get_params(deep=False)
    assert det.set_params(seed=3) is det and det.seed == 3


def test_list_settings_are_checked_at_construction():
    """A list setting given to a constructor: a list, a tuple, or a string as the command line writes it;
    a bare number or a wrong element is refused at once, naming the setting (not a TypeError at fit)."""
    padim, ensemble = get_method("padim"), get_method("ensemble")
    assert padim(layers="1,2").layers == [1, 2] and padim(layers=(1, 2)).layers == [1, 2]
    assert padim(layers=["blocks.2"]).layers == ["blocks.2"]  # levels by module name stay accepted
    assert padim(layers="1,blocks.4").layers == [1, "blocks.4"]  # in a string too, as --layers takes them
    assert ensemble(members="padim, svdd").members == ["padim", "svdd"]
    assert clone(padim(layers="1,2")).layers == [1, 2]
    for bad in (5, [1.5], [True], "1.5,2", "blocks 2.x"):
        with pytest.raises(InsightADError, match=r"layers: expected a list of int \(e.g. 1,2,3\)"):
            padim(layers=bad)
    with pytest.raises(InsightADError, match="members: expected a list of str"):
        ensemble(members=["padim", 3])


def test_switch_and_text_settings_are_checked_at_construction():
    """A switch takes true or false only (a config file's "no" was taken as true); a text setting takes text
    or a path."""
    svdd = get_method("svdd")
    for bad in ("no", 1, 0.0):
        with pytest.raises(InsightADError, match="standardize: expected true or false"):
            svdd(standardize=bad)
    with pytest.raises(InsightADError, match="backbone: expected text, got 5"):
        svdd(backbone=5)
    from pathlib import Path

    assert svdd(weights=Path("w.pth")).weights == "w.pth"


def test_fit_returns_self_and_learned_state_ends_in_underscore(fitted):
    method, det, returned = fitted
    assert returned is det
    learned = {k for k in vars(det) if k not in det.param_names()}
    assert learned and all(k.endswith("_") for k in learned), sorted(k for k in learned if not k.endswith("_"))
    assert np.isfinite(det.threshold_) and det.threshold_strategy_
    assert len(det.decision_scores_) >= 1


def test_higher_score_is_more_anomalous(fitted, images):
    _, det, _ = fitted
    _, normal, defective = images
    s_normal, s_defect = det.predict(normal, maps=False).scores, det.predict(defective, maps=False).scores
    assert s_defect.mean() > s_normal.mean()


def test_model_file_round_trip_scores_identically(fitted, images, tmp_path):
    from insightad.model_file import load_model, save_model

    _, det, _ = fitted
    path = save_model(det, tmp_path / "m.safetensors")
    again = load_model(path)
    test = images[1] + images[2]
    np.testing.assert_array_equal(det.predict(test, maps=False).scores, again.predict(test, maps=False).scores)
    assert again.threshold_ == det.threshold_ and again.get_params() == {**det.get_params(), "device": "cpu"}


def test_torch_and_onnx_engines_agree(fitted, images, tmp_path):
    """Scores within 1e-4 relative and score_normalized within 1e-4 absolute, on images at other sizes and
    aspect ratios and in gray too (the graph resizes them itself), and the same from the bare graph called the
    way another language would (decoded uint8 in, threshold and scale read from its metadata)."""
    import onnxruntime as ort

    from insightad.data.preprocess import Preprocessing
    from insightad.engines.onnx_runtime import read_onnx_metadata
    from insightad.inference.export import export_onnx
    from insightad.inference.load import load_for_inference
    from insightad.model_file import save_model

    _, det, _ = fitted
    if det.onnx_unsupported:
        pytest.skip(f"{det.method} declares it cannot be exported: {det.onnx_unsupported}")
    path = save_model(det, tmp_path / "m.safetensors")
    test = (images[1] + images[2] + [im.resize((77, 51)) for im in images[2][:2]]
            + [images[1][0].resize((130, 97)).convert("L")])
    ref = load_for_inference(path, engine="torch").predict(test)
    got = load_for_inference(path, engine="onnx").predict(test)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-6 * np.abs(ref.scores).max())
    np.testing.assert_allclose(got.scores_normalized, ref.scores_normalized, rtol=0, atol=1e-4)
    for a, b in zip(got.maps or [], ref.maps or []):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    graph = export_onnx(det, tmp_path / "m.onnx")
    meta = read_onnx_metadata(graph)
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    prep = Preprocessing(channels=meta["channels"])
    scores = np.array([sess.run(None, {"images": prep.decode(im)[None]})[0][0] for im in test], dtype=np.float64)
    normalized = 1 / (1 + np.exp(-(scores - meta["threshold"]) / meta["score_scale"]))
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-4, atol=1e-6 * np.abs(ref.scores).max())
    np.testing.assert_allclose(normalized, ref.scores_normalized, rtol=0, atol=1e-4)
