"""Hardening p46: an adversarial sweep of training. Every method and its options, the training loop (checkpoints,
--resume after Ctrl-C or with a damaged checkpoint, --time-budget, early stopping), --tile, --config files, augment
and the train report. Each test failed before its fix and passes after it."""

from __future__ import annotations

import pytest

from insightad.cli import main
from insightad.config import DataParams, DecisionParams
from insightad.errors import InsightADError


@pytest.fixture()
def given_params(monkeypatch):
    """Stop ``train`` where the fit would start, keeping the hyper-parameters the command line gathered."""
    import insightad.apps.train as train_app

    seen: dict = {}

    def stop(data, method, params, *args, **kwargs):
        seen.update(params, _decision=kwargs.get("decision"))
        raise InsightADError("stopped before the fit (test)")

    monkeypatch.setattr(train_app, "train_model", stop)
    return seen


@pytest.mark.parametrize("method", ["svdd", "autoencoder"])
def test_p46_time_budget_0_means_no_budget_for_a_trained_method(method, mvtec_dir, tmp_path, given_params, capsys):
    """``--time-budget 0`` ("0: no budget", says --help) was refused by auto's candidate budget ("expected a value
    > 0.0"), which took the same flag for every method; a config file's time_budget = 0 too."""
    out = tmp_path / "m.safetensors"
    code = main(["train", "--method", method, "--data", str(mvtec_dir), "--out", str(out), "--time-budget", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "stopped before the fit" in err, err
    assert given_params["time_budget"] == 0.0 and given_params["_decision"].time_budget == DecisionParams().time_budget
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'method = "{method}"\ntime_budget = 0\n')
    given_params.clear()
    assert main(["train", "--config", str(cfg), "--data", str(mvtec_dir), "--out", str(out)]) == 1
    assert "stopped before the fit" in capsys.readouterr().err and given_params["time_budget"] == 0.0
    # auto's own budget keeps its rule
    assert main(["train", "--method", "auto", "--data", str(mvtec_dir), "--out", str(out), "--time-budget", "0"]) == 1
    assert "time_budget: expected a value > 0" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["padim", "baseline"])
def test_p46_tiled_models_are_validated_on_their_tiles(method, mvtec_dir, tmp_path):
    """A tiled padim's out-of-fold validation fed whole images at the working size to the tile model (RuntimeError
    traceback: 'The expanded size of the tensor (64) must match the existing size (361)'); a tiled baseline's
    threshold came from whole-image features the model never scores. Both are refitted on the other folds now."""
    from insightad.apps.train import train_model

    det, _, _ = train_model(mvtec_dir, method, {"image_size": 32, "tile": 2, "overlap": 0.25}, DataParams(),
                            tmp_path / "m.safetensors", progress=False, decision=DecisionParams())
    decision = det.threshold_info_["decision"]
    assert decision["validation"].startswith("heldout-fold") and decision["n_normal"] >= 2


def _rewrite_checkpoint_meta(path, change) -> None:
    """Rewrite a checkpoint's metadata (``change(dict) -> str``), tensors as they were."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from insightad.training.checkpoint import META_KEY

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    save_file(load_file(str(path)), str(path), metadata={META_KEY: change(meta)})


@pytest.mark.parametrize("change, field", [
    (lambda m: "{not json", "not a JSON object"),
    (lambda m: "[1, 2]", "not a JSON object"),
    (lambda m: __import__("json").dumps({k: v for k, v in m.items() if k != "history"}), "'history' is missing"),
    (lambda m: __import__("json").dumps({k: v for k, v in m.items() if k != "optimizer"}), "'optimizer' is missing"),
    (lambda m: __import__("json").dumps({**m, "epoch": "x"}), "'epoch' is \"x\""),
    (lambda m: __import__("json").dumps({**m, "history": [1]}), "'history' holds an entry"),
    (lambda m: __import__("json").dumps({**m, "format_version": "abc"}), "unsupported checkpoint format"),
])
def test_p46_a_damaged_checkpoint_is_one_line_on_resume(tmp_path, change, field):
    """--resume on a checkpoint whose metadata was cut or edited: JSONDecodeError, KeyError, AttributeError,
    TypeError or ValueError tracebacks before; one line naming the file and the field now."""
    from tests.test_training_loop import _params, _train

    _train(_params(tmp_path, epochs=1))
    _rewrite_checkpoint_meta(tmp_path / "checkpoint.safetensors", change)
    with pytest.raises(InsightADError, match="checkpoint.safetensors: ") as e:
        _train(_params(tmp_path, epochs=2, resume=True))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_p46_ctrl_c_during_the_validation_says_the_training_is_kept(mvtec_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a trained method's validation model was refitted printed "interrupted during epoch 6; nothing
    was saved", though the final model's checkpoint held every epoch (--resume skips straight to the
    validation). It now names that checkpoint and --resume."""
    from insightad.apps.train import train_model
    from insightad.training.loop import TrainingLoop

    real_epoch = TrainingLoop._train_epoch

    def ctrl_c_in_validation_models(self, *args, **kwargs):
        if self.dir is None:  # the validation model trains without a checkpoint folder
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(TrainingLoop, "_train_epoch", ctrl_c_in_validation_models)
    params = {"arch": "bottleneck", "image_size": 32, "epochs": 1, "batch_size": 8}
    with pytest.raises(KeyboardInterrupt):
        train_model(mvtec_dir, "autoencoder", params, DataParams(), tmp_path / "m.safetensors", progress=False,
                    decision=DecisionParams())
    err = capsys.readouterr().err
    checkpoint = tmp_path / "m.training" / "checkpoint.safetensors"
    assert "nothing was saved" not in err and str(checkpoint) in err and "--resume" in err and checkpoint.is_file()


def test_p46_resume_continues_the_backbone_fine_tune_instead_of_redoing_it(mvtec_dir, tmp_path, monkeypatch):
    """``train --method svdd --backbone ssl --resume`` fine-tuned the backbone again from scratch (11 minutes on a
    CPU, and on a GPU maybe other weights under a checkpoint trained on the first ones); the fine-tune now continues
    from its own checkpoint beside the model, as the detector does."""
    import torch
    from safetensors.torch import load_file

    from insightad.apps.train import train_model
    from insightad.training.loop import TrainingLoop

    out = tmp_path / "m.safetensors"
    params = {"backbone": "ssl", "weights": "random", "image_size": 32, "epochs": 1, "batch_size": 8,
              "val_fraction": 0.0}
    train_model(mvtec_dir, "svdd", params, DataParams(), out, progress=False)
    backbone = tmp_path / "m.backbone.safetensors"
    before = load_file(str(backbone))
    real_epoch = TrainingLoop._train_epoch

    def no_ssl_epochs(self, *args, **kwargs):
        assert self.name != "ssl", "the backbone was fine-tuned again"
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(TrainingLoop, "_train_epoch", no_ssl_epochs)
    det, _, _ = train_model(mvtec_dir, "svdd", {**params, "epochs": 2, "resume": True}, DataParams(), out,
                            progress=False)
    assert det.training_.resumed_from == 1 and det.training_.epochs_run == 2
    after = load_file(str(backbone))  # the same weights (the file's metadata says it was resumed)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_p46_resume_on_other_images_says_so(tmp_path):
    """A checkpoint made on other images was refused as "made with data = '46b770423508a3c3', this run has
    '6273dab3b7af95b9'": a digest the user cannot read. It now says the training images differ."""
    from insightad.training import TrainingLoop
    from tests.test_training_loop import Classify, TinyNet, _images, _params

    TrainingLoop(_params(tmp_path, epochs=1), name="t", fingerprint={"data": "aaaa"}).run(TinyNet(), Classify(),
                                                                                         _images())
    again = TrainingLoop(_params(tmp_path, epochs=2, resume=True), name="t", fingerprint={"data": "bbbb"})
    with pytest.raises(InsightADError, match="made on other training images") as e:
        again.run(TinyNet(), Classify(), _images())
    assert "aaaa" not in str(e.value)
    with pytest.raises(InsightADError, match="made on other training images"):  # so is another number of images
        TrainingLoop(_params(tmp_path, epochs=2, resume=True), name="t", fingerprint={"data": "aaaa"}).run(
            TinyNet(), Classify(), _images(20))


def test_p46_a_config_key_of_another_method_names_the_method(mvtec_dir, tmp_path, capsys):
    """A config file for svdd used with --method padim said "unknown key 'epochs' in [train] (not an option of
    'insightad train')", though epochs is one of train's options (svdd's); it names the method now."""
    cfg = tmp_path / "svdd.toml"
    cfg.write_text('[train]\nmethod = "svdd"\nepochs = 2\n')
    code = main(["train", "--config", str(cfg), "--method", "padim", "--data", str(mvtec_dir),
                 "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "'epochs'" in err and "'insightad train --method padim'" in err, err


def test_p46_auto_refuses_a_candidate_listed_twice(mvtec_dir, tmp_path, capsys):
    """``--method auto --candidates padim,padim`` fitted padim twice and marked both rows of its table
    "<- chosen"; a repeated candidate is refused before any fit now."""
    out = tmp_path / "m.safetensors"
    code = main(["train", "--method", "auto", "--candidates", "baseline,baseline", "--data", str(mvtec_dir),
                 "--out", str(out), "--image-size", "32", "--no-onnx", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "'baseline' is listed twice" in captured.err and "fitting" not in captured.err
    assert not out.exists()


def test_p46_resume_after_early_stopping_follows_the_new_patience(tmp_path):
    """A run that stopped early, resumed with a larger --patience (or 0: never stop early) and more epochs, trained
    no further: the old run's "stopped early" was kept whatever patience the resumed run had (patience is one of
    the settings a resume may change)."""
    from insightad.training import TrainingLoop
    from tests.test_training_loop import Classify, TinyNet, _images, _params

    class Worse(Classify):  # the validation loss rises every epoch
        def loss(self, model, batch):
            loss, m = super().loss(model, batch)
            return (loss if model.training else loss * 0 + self.calls), m

    def run(**kw):
        return TrainingLoop(_params(tmp_path, **kw), name="t").run(TinyNet(), Worse(), _images(), _images(6, seed=1))

    first = run(epochs=10, patience=2)
    assert first.stopped_early and first.epochs_run == 3
    again = run(epochs=5, patience=0, resume=True)
    assert again.epochs_run == 5 and not again.stopped_early and again.best_epoch == 1
    same = run(epochs=8, patience=4, resume=True)  # 4 epochs without progress since epoch 1: stops at once
    assert same.epochs_run == 5 and same.stopped_early
