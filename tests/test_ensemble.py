"""Ensemble: members fitted and validated, scores on each member's normal spread averaged, validation
reused image by image, a model file that restores every member."""

from __future__ import annotations

import numpy as np
import pytest

from insightad.cli import main
from insightad.config import DataParams, DecisionParams
from insightad.errors import InsightADError
from insightad.methods import create_detector
from tests.conftest import SIZE

FAST = {"image_size": SIZE, "members": ["baseline", "padim"]}  # members with their defaults: the fast ones


@pytest.fixture(scope="module")
def ensemble(mvtec_dir, tmp_path_factory):
    from insightad.apps.train import train_model

    out = tmp_path_factory.mktemp("ensemble") / "disc-ensemble.safetensors"
    det, path, _ = train_model(mvtec_dir, "ensemble", dict(FAST), DataParams(), out, progress=False,
                               decision=DecisionParams())
    return det, path


def _test_images(mvtec_dir):
    return sorted(str(p) for p in (mvtec_dir / "test").rglob("*.png"))


def test_score_is_the_weighted_mean_of_the_members_standardised_scores(ensemble, mvtec_dir):
    det, _ = ensemble
    w = det.weights_
    assert w.shape == (2,) and w.sum() == pytest.approx(1.0) and np.all(w >= 0.1 - 1e-9)
    images = _test_images(mvtec_dir)
    got = det.predict(images, maps=False).scores
    z = [(m.predict(images, maps=False).scores - m.threshold_) / m.threshold_info_["scale"] for m in det.members_]
    np.testing.assert_allclose(got, w @ np.array(z), rtol=1e-4, atol=1e-5)
    pred = det.predict(images[:2], maps=True)
    padim = det.members_[1]
    want = (padim.predict(images[:2], maps=True).maps[0] - padim.threshold_) / padim.threshold_info_["scale"]
    np.testing.assert_allclose(pred.maps[0], 2 * w[1] * want, rtol=1e-4, atol=1e-4)  # only PaDiM has maps here


def test_validation_weights_favour_the_member_that_separates_and_stay_equal_on_a_tie():
    from insightad.methods.ensemble import validation_weights

    rng = np.random.default_rng(0)
    good_n, good_d = rng.normal(0, 1, 40), rng.normal(4, 1, 40)  # separates the defects from the normals
    noise_n, noise_d = rng.normal(0, 3, 40), rng.normal(0, 3, 40)  # says nothing, loudly
    w = validation_weights([good_n, noise_n], [good_d, noise_d])
    assert w[0] > 0.5 and w.sum() == pytest.approx(1.0) and min(w) >= 0.1 - 1e-9
    np.testing.assert_allclose(validation_weights([good_n, good_n], [good_d, good_d]), [0.5, 0.5])  # a tie: equal
    np.testing.assert_allclose(validation_weights([good_n] * 3, [good_d] * 3), [1 / 3] * 3)  # equal off the grid too
    np.testing.assert_allclose(validation_weights([good_n, noise_n], [good_d[:0], noise_d[:0]]), [0.5, 0.5])


def test_validation_reuses_the_members_own(ensemble):
    det, _ = ensemble
    oof = det.validation_
    assert oof.scheme.startswith("members")
    assert det.threshold_strategy_ == "oof_fpr"
    members = [m.validation_ for m in det.members_]
    common = set.intersection(*(set(v.normal_index.tolist()) for v in members))
    assert set(oof.normal_index.tolist()) == common and len(oof.defects) == len(common)
    assert oof.defect_maps is not None and oof.defect_maps[0].shape == (SIZE, SIZE)
    assert np.mean(oof.defect_scores) > np.mean(oof.normal_scores)


def test_other_folds_refit_the_whole_ensemble(ensemble, mvtec_dir):
    from insightad.data.layouts import discover, holdout_split
    from insightad.methods.crossfit import out_of_fold

    det, _ = ensemble
    train, _ = holdout_split(discover(mvtec_dir), 0.2, 0)
    oof = out_of_fold(det, [s.path for s in train], k=3, seed=0, synthetic=False)
    assert oof.scheme.startswith("heldout-fold (k=3)") and len(oof.normal_scores) == 10


def test_model_file_restores_every_member(ensemble, mvtec_dir):
    from insightad.model_file import load_model, read_metadata

    det, path = ensemble
    loaded = load_model(path)
    images = _test_images(mvtec_dir)
    np.testing.assert_allclose(loaded.predict(images, maps=False).scores, det.predict(images, maps=False).scores,
                               rtol=1e-5, atol=1e-6)
    assert [m.method for m in loaded.members_] == ["baseline", "padim"]
    assert [m.threshold_ for m in loaded.members_] == [m.threshold_ for m in det.members_]
    meta = read_metadata(path)
    assert meta["params"]["members"] == ["baseline", "padim"] and len(meta["state"]["members"]) == 2
    np.testing.assert_allclose(loaded.weights_, det.weights_, atol=1e-6)
    assert meta["params"]["weighting"] == "validation"


@pytest.mark.parametrize("members, word", [(["padim"], "at least two"), (["padim", "padim"], "different"),
                                           (["padim", "nope"], "nope"), (["padim", "ensemble"], "ensemble")])
def test_bad_members_are_refused_by_name(members, word):
    with pytest.raises(InsightADError, match="members") as e:
        create_detector("ensemble", image_size=SIZE, members=members).fit([np.zeros((SIZE, SIZE, 3), np.uint8)] * 4)
    assert word in str(e.value)


def test_cli_trains_an_ensemble_of_two_map_methods(mvtec_dir, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["train", "--data", str(mvtec_dir), "--method", "ensemble", "--members", "padim,patchcore",
                 "--image-size", str(SIZE), "--out", str(out), "--no-progress"]) == 0
    out_text = capsys.readouterr().out
    assert "members" in out_text and "member weights padim " in out_text and "(validation)" in out_text
    assert main(["predict", "--model", str(out), "--json", _test_images(mvtec_dir)[0]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"score"' in line


def _padim_and_svdd(mvtec_dir, svdd_layers):
    """A PaDiM on levels 1-3 and an SVDD on ``svdd_layers`` fitted on the same images, their ensemble model, and a
    batch of test images."""
    import torch

    from insightad.methods.ensemble import EnsembleModel

    train = sorted(str(p) for p in (mvtec_dir / "train" / "good").glob("*.png"))[:16]
    padim = create_detector("padim", image_size=SIZE, n_features=16, layers=[1, 2, 3]).fit(train)
    svdd = create_detector("svdd", image_size=SIZE, epochs=5, patience=0, val_fraction=0.0,
                           layers=svdd_layers).fit(train)
    model = EnsembleModel([padim.model_, svdd.model_], torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]),
                          [True, False]).eval()
    x = torch.from_numpy(np.stack([padim.load_input(p)[0] for p in _test_images(mvtec_dir)[:3]]))
    return svdd, model, x


def _shared_pass_scores_as_whole(model, x) -> None:
    import torch

    with torch.inference_mode():
        shared = model(x)
        model.shared = False
        whole = model(x)
    for a, b in zip(shared, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_members_on_the_same_backbone_share_one_pass(mvtec_dir):
    """PaDiM and SVDD on the same levels of the same backbone: the ensemble runs it once, with the same result as
    running each member whole; a member whose backbone differs is run on its own."""
    import torch

    svdd, model, x = _padim_and_svdd(mvtec_dir, [1, 2, 3])
    assert model.share_backbone() and model.picks == [[0, 1, 2], [0, 1, 2]]
    _shared_pass_scores_as_whole(model, x)
    with torch.no_grad():
        next(svdd.model_.features.extractor.parameters()).add_(1.0)
    assert not model.share_backbone()


def test_a_member_whose_levels_cover_the_others_runs_the_backbone_for_all(mvtec_dir):
    """SVDD on levels 0-3 (its default) computes PaDiM's 1-3 too: one pass (SVDD's), each member given its own
    levels, the same result as running each whole; a backbone cut after another deepest level (2-4) is not
    shared."""
    _, model, x = _padim_and_svdd(mvtec_dir, [0, 1, 2, 3])
    assert model.share_backbone() and model.host == 1 and model.picks == [[1, 2, 3], [0, 1, 2, 3]]
    _shared_pass_scores_as_whole(model, x)
    _, deeper, _ = _padim_and_svdd(mvtec_dir, [2, 3, 4])
    assert not deeper.share_backbone()


def test_a_file_from_before_the_weights_loads_as_the_plain_mean(ensemble, tmp_path, mvtec_dir):
    """A model file written before ``weighting`` existed (no setting, no weights, scales = the members' spreads)
    loads with equal weights and scores with the plain mean of the standardised scores."""
    import json

    from safetensors.numpy import load_file, save_file

    from insightad.model_file import META_KEY, load_model, read_metadata

    det, path = ensemble
    meta = read_metadata(path, check_params=False)
    del meta["params"]["weighting"], meta["state"]["weights"], meta["content_sha256"]  # as written before
    tensors = load_file(str(path))
    tensors["scale"] = np.array([float(m.threshold_info_["scale"]) for m in det.members_], dtype=np.float32)
    old = tmp_path / "old-ensemble.safetensors"
    save_file(tensors, str(old), metadata={META_KEY: json.dumps(meta)})
    loaded = load_model(old)
    assert loaded.weighting == "equal"
    np.testing.assert_allclose(loaded.weights_, [0.5, 0.5])
    images = _test_images(mvtec_dir)[:4]
    z = [(m.predict(images, maps=False).scores - m.threshold_) / m.threshold_info_["scale"] for m in det.members_]
    np.testing.assert_allclose(loaded.predict(images, maps=False).scores, np.mean(z, axis=0), rtol=1e-4, atol=1e-5)
