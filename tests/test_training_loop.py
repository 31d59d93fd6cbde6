"""The shared training loop: determinism, checkpoints, resume after Ctrl-C, early stopping, curves, bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from insightad import config
from insightad.errors import InsightADError
from insightad.training import TrainingLoop
from insightad.training.checkpoint import FILE_NAME, load_checkpoint


class TinyNet(nn.Module):
    """A conv net on uint8 images with batch norm (so running statistics must survive a resume)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x.float() / 255.0)))
        return self.fc(h.mean(dim=(2, 3)))


class Classify:
    """Predict whether the left half is brighter than the right one; an optional hook interrupts."""

    inputs_are_images = True

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls, self.interrupt_at = 0, interrupt_at

    def loss(self, model, batch):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        y = (batch[:, :, :, :4].float().mean((1, 2, 3)) > batch[:, :, :, 4:].float().mean((1, 2, 3))).long()
        logits = model(batch)
        return nn.functional.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean().item()}

    def end_epoch(self, model, epoch):
        pass


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def _params(tmp_path=None, **kw) -> config.TrainLoopParams:
    base = dict(epochs=4, batch_size=5, lr=1e-2, device="cpu", patience=0,
                checkpoint_dir=str(tmp_path) if tmp_path else None)
    return config.build(config.TrainLoopParams, {**base, **kw})


def _train(params, objective=None, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    data = _images()
    result = TrainingLoop(params, name="tiny").run(model, objective or Classify(), data[:18], data[18:])
    return model, result


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


ONE_STEP = {"epochs": 1, "batch_size": 18}  # 18 training images: exactly one optimiser step


def test_one_step_is_deterministic_on_cpu():
    start = TinyNet()
    torch.manual_seed(0)
    start.load_state_dict(TinyNet().state_dict())
    a, _ = _train(_params(**ONE_STEP))
    b, _ = _train(_params(**ONE_STEP))
    assert _same(a, b) and not _same(a, start)  # the step changed the weights, the same way twice


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_one_step_on_gpu_matches_cpu():
    # SGD: Adam's first step is lr * sign(gradient), which turns rounding noise in near-zero gradients into lr
    cpu, _ = _train(_params(**ONE_STEP, optimizer="sgd", device="cpu"))
    gpu, _ = _train(_params(**ONE_STEP, optimizer="sgd", device="cuda"))
    for k, v in cpu.state_dict().items():
        assert torch.allclose(v.float(), gpu.state_dict()[k].cpu().float(), atol=1e-5), k


def test_checkpoint_curves_and_history(tmp_path):
    model, result = _train(_params(tmp_path))
    assert result.epochs_run == 4 and len(result.history) == 4
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(result.history[0])
    model_sd, optim_sd, best, info = load_checkpoint(tmp_path / FILE_NAME)
    assert info["epoch"] == 4 and optim_sd["state"] and best is not None
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "history.json").read_text())["epochs_run"] == 4


def test_interrupt_leaves_a_checkpoint_and_resume_matches_uninterrupted(tmp_path, capsys):
    straight, _ = _train(_params(tmp_path / "a"))
    # 4 training batches + 2 validation batches per epoch: call 15 falls in epoch 3
    with pytest.raises(KeyboardInterrupt):
        _train(_params(tmp_path / "b"), Classify(interrupt_at=15))
    assert "last complete checkpoint (epoch 2)" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "b" / FILE_NAME)[3]["epoch"] == 2
    assert not list((tmp_path / "b").glob(".*.tmp"))  # no half-written file left behind
    resumed, result = _train(_params(tmp_path / "b", resume=True), seed=123)  # init is overwritten by the checkpoint
    assert result.resumed_from == 2 and result.epochs_run == 4
    assert _same(straight, resumed)


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    _train(_params(tmp_path, epochs=1))
    with pytest.raises(InsightADError, match=r"lr = 0.01, this run has 0.001"):
        _train(_params(tmp_path, lr=1e-3, resume=True))
    with pytest.raises(InsightADError, match="no checkpoint to resume from"):
        _train(_params(tmp_path / "empty", resume=True))
    with pytest.raises(InsightADError, match="resume: needs --checkpoint-dir"):
        _train(_params(None, resume=True))


def test_early_stopping_keeps_best_weights():
    class Worse(Classify):  # validation loss rises every epoch: stop after `patience` epochs
        def loss(self, model, batch):
            loss, m = super().loss(model, batch)
            return (loss if model.training else loss * 0 + self.calls), m

    model, result = _train(_params(epochs=10, patience=2), Worse())
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_diverging_loss_is_reported():
    class Nan(Classify):
        def loss(self, model, batch):
            loss, m = super().loss(model, batch)
            return loss * float("nan"), m

    with pytest.raises(InsightADError, match="training loss became nan.*lower --lr"):
        _train(_params(), Nan())


@pytest.mark.parametrize("field, value, message", [
    ("epochs", -1, "epochs: expected a value >= 1, got -1"),
    ("epochs", 0, "epochs: expected a value >= 1, got 0"),
    ("batch_size", 0, "batch_size: expected a value >= 1, got 0"),
    ("lr", 0.0, "lr: expected a value > 0.0, got 0.0"),
    ("lr", -0.1, "lr: expected a value > 0.0, got -0.1"),
    ("lr", float("nan"), "lr: expected a finite number, got nan"),
    ("lr", "fast", "lr: expected a number, got 'fast'"),
    ("optimizer", "rmsprop", "optimizer: expected one of adam, adamw, sgd, got 'rmsprop'"),
    ("val_fraction", 0.9, "val_fraction: expected a value <= 0.5, got 0.9"),
])
def test_bad_hyper_parameters_are_named(field, value, message):
    with pytest.raises(InsightADError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _params(**{field: value})


def test_unknown_augmentation_is_named():
    with pytest.raises(InsightADError, match="augment: unknown augmentation 'flip' \\(available: none"):
        TrainingLoop(_params(augment="flip"), name="tiny")


def test_augment_hook_sees_every_training_batch():
    seen = []

    def hook(images, generator):
        seen.append(images.shape[0])
        return 255 - images

    torch.manual_seed(0)
    TrainingLoop(_params(epochs=2), name="tiny", augment=hook).run(TinyNet(), Classify(), _images()[:18], _images()[18:])
    assert sum(seen) == 2 * 18  # training images only, not the validation ones


def test_per_image_pil_transforms_are_reproducible_batch_hooks():
    from PIL import ImageOps

    from insightad.training import per_image
    from insightad.training.loop import epoch_generator

    def maybe_mirror(img, rng):
        return ImageOps.mirror(img) if rng.random() < 0.5 else img

    hook = per_image(maybe_mirror)
    x = _images(8)
    a, b = hook(x, epoch_generator(0, 3)), hook(x, epoch_generator(0, 3))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    mirrored = [torch.equal(a[i], x[i].flip(-1)) for i in range(8)]
    assert any(mirrored) and not all(mirrored)
    with pytest.raises(InsightADError, match="changed the image shape"):
        per_image(lambda img, rng: img.resize((4, 4)))(x, epoch_generator(0, 0))


class FakeClock:
    """A clock that advances ``step`` seconds each time it is read: the budget is tested without waiting."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_time_budget_stops_after_the_step_that_reaches_it():
    # 18 training images in batches of 5: 4 steps per epoch. The clock is read once at the start and once
    # after every step, 1 s each: a 6 s budget ends the run after the 6th step (2nd step of epoch 2).
    objective = Classify()
    torch.manual_seed(0)
    data = _images()
    loop = TrainingLoop(_params(epochs=50, time_budget=6.0), name="tiny", clock=FakeClock(1.0))
    result = loop.run(TinyNet(), objective, data[:18], data[18:])
    assert result.stop_reason == "time_budget" and result.epochs_run == 2 and not result.stopped_early
    assert result.history[-1]["train_fraction"] == pytest.approx(10 / 18)  # the partial epoch says so
    assert "val_loss" in result.history[-1]  # and is still validated (early stopping keeps the best weights)
    assert result.summary()["stop_reason"] == "time_budget"


def test_no_budget_runs_every_epoch_and_early_stopping_still_applies_under_a_budget():
    _, result = _train(_params(epochs=3))
    assert result.stop_reason == "epochs" and result.epochs_run == 3

    class Worse(Classify):  # validation loss rises every epoch: early stopping ends it before the budget
        def loss(self, model, batch):
            loss, m = super().loss(model, batch)
            return (loss if model.training else loss * 0 + self.calls), m

    data = _images()
    loop = TrainingLoop(_params(epochs=10, patience=2, time_budget=1000.0), name="tiny", clock=FakeClock(1.0))
    result = loop.run(TinyNet(), Worse(), data[:18], data[18:])
    assert result.stop_reason == "early_stopping" and result.epochs_run == 3 and result.best_epoch == 1
