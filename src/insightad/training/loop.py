"""The one training loop every trainable method uses.

A method supplies a module with the trainable parameters, an :class:`Objective` (batch -> loss
and metrics) and its training/validation inputs as tensors; the loop does the rest: seeded
shuffling, the optimiser, the augmentation hook, validation and early stopping, a checkpoint
after every epoch (atomic safetensors, so Ctrl-C leaves the last complete epoch usable),
``resume``, progress bars and the loss curve, and a time budget (``time_budget`` seconds: the loop
stops after the step that reaches it, validates that last, possibly partial, epoch and keeps the best
weights; a partial epoch is not checkpointed, so ``resume`` redoes it whole; the clock is injectable so the
budget is tested without waiting).

Resuming gives the same result as an uninterrupted run: shuffling and augmentation draw from a
generator seeded by (seed, epoch), and the checkpoint holds the model, the optimiser state, the
best weights so far and the early-stopping counters.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from insightad.config import TrainLoopParams
from insightad.errors import InsightADError
from insightad.runtime import resolve_device
from insightad.training import checkpoint as ckpt
from insightad.training.augment import Augment, get_augmentation
from insightad.training.curves import plot_curve

# Settings that may change between a run and its resumption; every other one must match.
RESUMABLE = ("epochs", "resume", "checkpoint_dir", "device", "workers", "patience", "time_budget")
STOP_REASONS = ("epochs", "early_stopping", "time_budget")  # why a run ended (TrainResult.stop_reason)
MIN_IMPROVEMENT = 1e-4  # relative decrease of the validation loss that counts as progress
DATA_KEYS = ("data", "data_content", "n_train", "n_val")  # fingerprint entries that describe the training images
LONG_RUN_S = 600.0  # a CPU run estimated to take longer than this is announced, with the estimate


class LongTrainingWarning(UserWarning):
    """The training run about to happen on the CPU is estimated to take long (minutes to hours)."""


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _made(diff: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    """How a checkpoint's run differed from this one, for the refusal: a setting, or the training images (their
    names and number, else their content)."""
    names = [k for k in diff if k in DATA_KEYS and k != "data_content"]
    if names:
        return ("on other training images (their paths, number or order differ: another dataset, --holdout, --seed "
                "or --val-fraction)")
    if "data_content" in diff:
        return "on training images whose content has changed since (the same file names, other bytes: replaced or edited)"
    k = diff[0]
    return f"with {k} = {old.get(k)!r}, this run has {new.get(k)!r}"


class Objective(Protocol):
    """What a method tells the loop: how to turn a batch into a loss (and metrics to report)."""

    inputs_are_images: bool  # True: batches are uint8 images, and the augmentation applies to them

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of the batch (differentiable) and metrics (batch means) to average per epoch."""
        ...

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called after each epoch's training batches, before validation (may update buffers)."""
        ...


@dataclass
class TrainResult:
    """What happened: per-epoch history, where things were written, why it stopped."""

    history: list[dict[str, Any]]
    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    resumed_from: int
    seconds: float
    checkpoint: Path | None = None
    curves: list[Path] = field(default_factory=list)
    stop_reason: str = "epochs"  # one of STOP_REASONS
    time_budget: float = 0.0  # the budget the run had, in seconds (0: none)

    def best(self) -> dict[str, Any]:
        """The history entry whose weights the model ended with."""
        if not self.history:
            return {}
        if self.best_epoch is None:
            return self.history[-1]
        return next(h for h in self.history if h["epoch"] == self.best_epoch)

    def summary(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
                "stop_reason": self.stop_reason, "time_budget_s": self.time_budget,
                "resumed_from_epoch": self.resumed_from, "seconds": round(self.seconds, 3),
                "final": {k: v for k, v in self.best().items() if k != "seconds"},
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def make_optimizer(params: TrainLoopParams, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not parameters:
        raise InsightADError("training: the model has no trainable parameters")
    if params.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=params.lr, weight_decay=params.weight_decay)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)
    if params.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=params.lr, momentum=0.9, weight_decay=params.weight_decay)
    raise InsightADError(f"optimizer: expected one of adam, adamw, sgd, got {params.optimizer!r}")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's shuffling and augmentation: a function of (seed, epoch) only."""
    state = np.random.SeedSequence([int(seed), int(epoch), 11]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def fingerprint(params: Any, **extra: Any) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    import dataclasses

    out = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in RESUMABLE}
    out.update(extra)
    return json.loads(json.dumps(out, default=str))


class TrainingLoop:
    """Runs ``objective`` on ``model`` for ``params.epochs`` epochs (see the module docstring)."""

    def __init__(self, params: TrainLoopParams, *, name: str, progress: bool = False,
                 augment: Augment | None = None, fingerprint: dict[str, Any] | None = None,
                 curve_metrics: dict[str, float | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.p, self.name, self.progress = params, name, progress
        self.clock = clock  # seconds; the time budget reads it after every step (a test passes a fake one)
        self._deadline: float | None = None
        self._out_of_time = False
        self.augment = augment or get_augmentation(params.augment)
        self.fingerprint = fingerprint if fingerprint is not None else {}
        self.curve_metrics = curve_metrics or {}  # extra metric -> chance level line (or None)
        self.device = resolve_device(params.device)
        self._estimated = False
        self.dir = Path(params.checkpoint_dir).expanduser() if params.checkpoint_dir else None
        if params.resume and self.dir is None:
            raise InsightADError("resume: needs --checkpoint-dir (the folder a previous run wrote its checkpoint to)")
        if params.resume and not self._checkpoint_file().is_file():  # say so before any slow work
            raise InsightADError(f"{self.checkpoint_path}: no checkpoint to resume from "
                                 "(train once without --resume first)")

    @property
    def checkpoint_path(self) -> Path | None:
        return self.dir / ckpt.FILE_NAME if self.dir else None

    def _checkpoint_file(self) -> Path:
        """The checkpoint path where one must exist (resume, saving): a checkpoint folder is set."""
        path = self.checkpoint_path
        if path is None:
            raise InsightADError(f"{self.name}: no checkpoint folder set (--checkpoint-dir)")
        return path

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, objective: Objective, train: torch.Tensor,
            val: torch.Tensor | None = None) -> TrainResult:
        """Train ``model`` in place; at the end it holds the best weights (lowest validation loss)
        when there is a validation set, else the last ones."""
        p = self.p
        t0 = time.perf_counter()
        self._deadline = self.clock() + p.time_budget if p.time_budget > 0 else None
        self._out_of_time = False
        if len(train) == 0:
            raise InsightADError(f"{self.name}: no training images")
        val = val if val is not None and len(val) else None
        model.to(self.device)
        optimizer = make_optimizer(p, [q for q in model.parameters() if q.requires_grad])
        state: dict[str, Any] = {"epoch": 0, "history": [], "best_loss": None, "best_epoch": None, "bad_epochs": 0,
                 "stopped_early": False}
        best: dict[str, torch.Tensor] | None = None
        fp = {"trainer": self.name, **fingerprint(p), **self.fingerprint, "n_train": int(len(train)),
              "n_val": int(len(val)) if val is not None else 0}
        if p.resume:
            best, state = self._resume(model, optimizer, fp)
        resumed_from = state["epoch"]
        epochs = tqdm(range(state["epoch"], p.epochs), initial=state["epoch"], total=p.epochs,
                      desc=f"{self.name}: epochs", unit="epoch", disable=not self.progress)
        epoch = state["epoch"]
        try:
            for epoch in epochs:
                if state["stopped_early"]:
                    break
                t_epoch = time.perf_counter()
                record = {"epoch": epoch + 1, **self._train_epoch(model, objective, optimizer, train, epoch)}
                objective.end_epoch(model, epoch)
                if val is not None:
                    record.update({f"val_{k}": v for k, v in self._evaluate(model, objective, val).items()})
                    best = self._early_stopping(model, record["val_loss"], epoch + 1, state, best)
                record["seconds"] = round(time.perf_counter() - t_epoch, 3)
                state["history"].append(record)
                state["epoch"] = epoch + 1
                epochs.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.endswith("loss")})
                # An epoch the time budget cut short is kept in this run's model and history, not in the checkpoint:
                # --resume redoes it whole from the last complete epoch, so the resumed run is the uninterrupted one
                # (checkpointed, its unseen batches were never trained on).
                if self.dir is not None and "train_fraction" not in record:
                    ckpt.save_checkpoint(self._checkpoint_file(), model, optimizer, best,
                                         {"fingerprint": fp, **state})
                if self._out_of_time:
                    break
        except KeyboardInterrupt:
            self._say_interrupted(state, epoch)
            raise
        finally:
            epochs.close()
        if best is not None:
            model.load_state_dict(best)
        model.eval()
        reason = ("time_budget" if self._out_of_time else "early_stopping" if state["stopped_early"] else "epochs")
        result = TrainResult(state["history"], state["epoch"], state["best_epoch"], state["stopped_early"],
                             resumed_from, time.perf_counter() - t0, self.checkpoint_path, stop_reason=reason,
                             time_budget=float(p.time_budget))
        result.curves = self._write_curves(state)
        if self.dir is not None:
            from insightad.io import atomic_write

            atomic_write(self.dir / "history.json",
                         lambda tmp: tmp.write_text(json.dumps(result.summary() | {"history": result.history},
                                                               indent=1)))
        return result

    # ------------------------------------------------------------------ pieces
    def _say_interrupted(self, state: dict[str, Any], epoch: int) -> None:
        """Ctrl-C: where the last complete epoch is kept. A run without a checkpoint folder (a validation model
        refitted on some folds) says nothing: "nothing was saved" read as if the whole training were lost, while
        the final model's own checkpoint was complete (its caller says so)."""
        if self.dir is None:
            return
        self._write_curves(state)
        where = (f"the last complete checkpoint (epoch {state['epoch']}) is {self.checkpoint_path}; continue with "
                 "--resume") if state["epoch"] else "no epoch was complete, so nothing was saved"
        print(f"{self.name}: interrupted during epoch {epoch + 1}; {where}", file=sys.stderr)

    def _batches(self, n: int, generator: torch.Generator | None) -> list[torch.Tensor]:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        return list(order.split(self.p.batch_size))

    def _train_epoch(self, model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                     train: torch.Tensor, epoch: int) -> dict[str, float]:
        model.train()
        g = epoch_generator(self.p.seed, epoch)
        sums: dict[str, float] = {}
        batches = self._batches(len(train), g)
        t_start = time.perf_counter()
        seen = 0
        for idx in tqdm(batches, desc=f"{self.name}: epoch {epoch + 1}", unit="batch", leave=False,
                        disable=not self.progress):
            x = train[idx]
            if objective.inputs_are_images:
                x = self.augment(x, g)
            x = x.to(self.device, non_blocking=True)
            loss, metrics = objective.loss(model, x)
            if not torch.isfinite(loss):
                raise InsightADError(f"{self.name}: the training loss became {loss.item()} in epoch {epoch + 1} "
                                     f"(lr {self.p.lr:g} is probably too high; try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not self._estimated:  # one batch timed: say how long the whole run will be
                self._announce_duration(time.perf_counter() - t_start, len(batches), epoch)
            _accumulate(sums, {"loss": float(loss.detach()), **metrics}, len(idx))
            seen += len(idx)
            if self._deadline is not None and self.clock() >= self._deadline:
                self._out_of_time = True  # this epoch ends here; it is still validated and checkpointed
                break
        out = {f"train_{k}": v / seen for k, v in sums.items()}
        if seen < len(train):
            out["train_fraction"] = seen / len(train)
        return out

    def _announce_duration(self, batch_seconds: float, n_batches: int, epoch: int) -> None:
        """Before a long CPU run gets far: warn with the estimated time (one batch x batches x epochs left)."""
        self._estimated = True
        if self.device.type != "cpu":
            return
        left = self.p.epochs - epoch
        total = batch_seconds * n_batches * left
        budget = self.p.time_budget
        if total > LONG_RUN_S and (not budget or budget > LONG_RUN_S):
            capped = f"; the time budget stops it after {format_duration(budget)}" if budget and budget < total else ""
            warnings.warn(f"{self.name}: training on the CPU will take about {format_duration(min(total, budget or total))} "
                          f"({left} epochs x {n_batches} batches at {batch_seconds:.2f} s each{capped}; early stopping "
                          "may end it sooner); lower --epochs, --time-budget or --image-size, or train on a GPU",
                          LongTrainingWarning, stacklevel=4)

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, objective: Objective, data: torch.Tensor) -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        for idx in self._batches(len(data), None):
            loss, metrics = objective.loss(model, data[idx].to(self.device, non_blocking=True))
            _accumulate(sums, {"loss": float(loss), **metrics}, len(idx))
        return {k: v / len(data) for k, v in sums.items()}

    def _early_stopping(self, model: nn.Module, val_loss: float, epoch: int, state: dict[str, Any],
                        best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Keep the best weights; after ``patience`` epochs without progress, stop."""
        b = state["best_loss"]
        if b is None or (math.isfinite(val_loss) and val_loss < b - MIN_IMPROVEMENT * abs(b)):
            state.update(best_loss=val_loss, best_epoch=epoch, bad_epochs=0)
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state["bad_epochs"] += 1
        if self.p.patience and state["bad_epochs"] >= self.p.patience:
            state["stopped_early"] = True
        return best

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, fp: dict[str, Any]
                ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        path = self._checkpoint_file()
        model_sd, optim_sd, best, info = ckpt.load_checkpoint(path)
        old = info.get("fingerprint", {})
        # A checkpoint written before the content was recorded is checked on the images' names only.
        diff = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k) and (k != "data_content" or k in old)]
        if diff:
            raise InsightADError(f"{path}: cannot resume: the checkpoint was made {_made(diff, old, fp)} (train "
                                 "without --resume to start over)")
        try:
            model.load_state_dict(model_sd, strict=True)
            optimizer.load_state_dict(optim_sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise InsightADError(f"{path}: the checkpoint does not fit this model ({str(e).splitlines()[0][:200]})"
                                 ) from None
        state = {k: info[k] for k in ("epoch", "history", "best_loss", "best_epoch", "bad_epochs", "stopped_early")}
        # patience may change on resume: whether the run has stopped early is this run's rule, not the last one's
        state["stopped_early"] = bool(self.p.patience) and state["bad_epochs"] >= self.p.patience
        return best, state

    def _write_curves(self, state: dict[str, Any]) -> list[Path]:
        if self.dir is None or not state["history"]:
            return []
        out = [plot_curve(state["history"], "loss", self.dir / "loss.png", f"{self.name}: loss per epoch",
                          state["best_epoch"])]
        for metric, chance in self.curve_metrics.items():
            out.append(plot_curve(state["history"], metric, self.dir / f"{metric}.png",
                                  f"{self.name}: {metric} per epoch", state["best_epoch"], chance))
        return [p for p in out if p is not None]


def _accumulate(sums: dict[str, float], values: dict[str, float], n: int) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + float(v) * n
