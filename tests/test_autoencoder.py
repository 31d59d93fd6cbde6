"""Autoencoder: the loss falls, defects reconstruct worse than normal regions, grayscale and colour,
the seed's architecture, large inputs, ONNX parity and a model-file round trip; the default
feature-reconstruction network the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from insightad.data.synthetic import make_image
from insightad.errors import InsightADError
from insightad.methods import create_detector
from insightad.methods.autoencoder import ReconstructionObjective

FAST = dict(image_size=64, epochs=12, batch_size=8, lr=3e-3, val_fraction=0.0, patience=0, device="cpu",
            latent=16, arch="bottleneck")  # the pixel network; FEATURES below is the default one
FEATURES = dict(image_size=64, epochs=15, batch_size=8, lr=3e-3, val_fraction=0.0, patience=0, device="cpu",
                workers=0)


def _images(kind: str, n: int, seed: int, gray: bool = False):
    return [make_image(kind, size=64, seed=seed + i, grayscale=gray)[0] for i in range(n)]


@pytest.fixture(scope="module")
def plate_ae():
    return create_detector("autoencoder", **FAST).fit(_images("plate", 32, 0))


def test_loss_decreases_and_threshold_set(plate_ae):
    hist = plate_ae.training_.history
    assert hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    assert plate_ae.threshold_ > 0 and plate_ae.preprocessing_.channels == 3


def test_defect_pixels_have_higher_error(plate_ae):
    labels, scores = [], []
    for i in range(6):
        img, mask = make_image("plate", "missing", size=64, seed=500 + i)
        m = plate_ae.predict([img]).maps[0]
        assert m.shape == mask.shape
        labels.append(mask.ravel())
        scores.append(m.ravel())
    assert roc_auc_score(np.concatenate(labels), np.concatenate(scores)) > 0.75


def test_grayscale_data_gives_grayscale_model_and_large_inputs():
    det = create_detector("autoencoder", **{**FAST, "epochs": 2}).fit(_images("weave", 12, 0, gray=True))
    assert det.preprocessing_.channels == 1
    big = make_image("weave", size=256, seed=99, grayscale=True)[0].resize((1024, 1024))
    pred = det.predict([big, np.asarray(make_image("weave", size=64, seed=3)[0])])
    assert pred.maps[0].shape == (1024, 1024) and pred.maps[1].shape == (64, 64)


def test_conv4_architecture_is_grayscale_with_four_convolutions():
    det = create_detector("autoencoder", **{**FAST, "epochs": 1, "arch": "conv4"}).fit(_images("disc", 8, 0))
    net = det.model_.net
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256] and all(c.stride == (2, 2) for c in convs)
    assert det.preprocessing_.channels == 1 and isinstance(net.decoder[-1], torch.nn.Sigmoid)


def test_loss_formula():
    # (was a test of the removed reconstruction_loss helper: the same formula, through the objective the loop uses)
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    xf = x.float() / 255.0
    same = ReconstructionObjective(0.84, 11).loss(torch.nn.Identity(), x)[0]
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    shift = ReconstructionObjective(0.0, 11).loss(lambda t: torch.clamp(t + 0.1, 0, 1), x)[0]
    assert float(shift) == pytest.approx(float(((xf - torch.clamp(xf + 0.1, 0, 1)) ** 2).mean()), rel=1e-5)


def test_round_trip_and_onnx_parity(plate_ae, tmp_path):
    from insightad.inference.load import load_for_inference
    from insightad.model_file import save_model

    path = save_model(plate_ae, tmp_path / "ae.safetensors")
    imgs = [make_image("plate", "blob", size=80, seed=s)[0] for s in range(4)]
    ref = plate_ae.predict(imgs)
    torch_det = load_for_inference(path, "torch")
    np.testing.assert_array_equal(torch_det.predict(imgs).scores, ref.scores)
    onnx_det = load_for_inference(path, "onnx")
    got = onnx_det.predict(imgs)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4)
    np.testing.assert_allclose(got.maps[0], ref.maps[0], rtol=1e-4, atol=1e-4 * float(np.abs(ref.maps[0]).max()))


@pytest.mark.parametrize("bad,msg", [({"image_size": 72}, "multiple of 16"), ({"alpha": 1.5}, "alpha"),
                                     ({"epochs": -1}, "epochs"), ({"batch_size": 0}, "batch_size")])
def test_bad_settings(bad, msg):
    with pytest.raises(InsightADError, match=msg):
        create_detector("autoencoder", **{**FAST, **bad}).fit(_images("disc", 4, 0))


def test_augmented_training_runs(tmp_path):
    det = create_detector("autoencoder", **{**FAST, "epochs": 1, "augment": "affine"}).fit(_images("disc", 8, 0))
    assert np.isfinite(det.threshold_)


@pytest.fixture(scope="module")
def feature_ae():
    return create_detector("autoencoder", **FEATURES).fit(_images("plate", 24, 0))


def test_default_is_feature_reconstruction_and_finds_defects(feature_ae):
    assert create_detector("autoencoder").arch == "features" and feature_ae.uses_backbone
    hist = feature_ae.training_.history
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    normal = [make_image("plate", size=64, seed=300 + i)[0] for i in range(6)]
    bad = [make_image("plate", "missing", size=64, seed=600 + i)[0] for i in range(6)]
    scores = feature_ae.predict(normal + bad).scores
    assert roc_auc_score([0] * 6 + [1] * 6, scores) > 0.8
    assert feature_ae.predict([bad[0]]).maps[0].shape == (64, 64)


def test_feature_autoencoder_round_trip_and_onnx_parity(feature_ae, tmp_path):
    from insightad.inference.load import load_for_inference
    from insightad.model_file import read_metadata, save_model

    path = save_model(feature_ae, tmp_path / "fae.safetensors")
    assert read_metadata(path)["backbone"]["layers"] == [1, 2, 3]
    imgs = [make_image("plate", "blob", size=80, seed=s)[0] for s in range(3)]
    ref = feature_ae.predict(imgs)
    np.testing.assert_array_equal(load_for_inference(path, "torch").predict(imgs).scores, ref.scores)
    got = load_for_inference(path, "onnx").predict(imgs)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4)


def test_time_budget_is_the_autoencoders_default_bound():
    det = create_detector("autoencoder")
    assert det.time_budget == 600.0 and det.epochs >= 100
