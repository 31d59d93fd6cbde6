"""insightad train: fit a method on the normal images of a dataset and write one model file."""

from __future__ import annotations

import argparse
import sys

from insightad.cli.common import (add_data_flags, add_progress_flag, data_params, new_parser, warnings_as_lines,
                                  with_config)
from insightad.cli.options import add_dataclass_args, gather, load_config_file
from insightad.methods import available, backbone_trainers, get_class, params_class


def _method_from(argv: list[str]) -> str:
    """The method named on the command line or in the config file: it decides which flags exist."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", "--mode", dest="method")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.method:
        return known.method
    if known.config:
        cfg = load_config_file(known.config, "train")
        m = cfg["__section__"].get("method") or cfg["__flat__"].get("method") or cfg["__flat__"].get("mode")
        if m:
            return str(m)
    return "baseline"


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    method = _method_from(argv)
    p = new_parser(sub, "train", "fit a detector on normal images and write its model file",
                   "Fit a detector on the normal training images of --data and write one model file. "
                   "Where the layout has no test split, --holdout of the normal images are kept aside "
                   "(recorded in the model file) for calibrate and evaluate. '--method ssl' trains a "
                   "backbone instead and writes a backbone file for '--backbone ssl:PATH'. Method-specific "
                   "flags are listed by 'insightad train --method NAME --help'.")
    p.add_argument("--method", "--mode", dest="method", default="baseline",
                   choices=available() + backbone_trainers(),
                   help="detection method, or ssl to train a backbone")
    add_data_flags(p)
    p.add_argument("--out", "--output", dest="out", metavar="MODEL",
                   help="model file (ssl: backbone file) to write (default: models/<data>-<method>.safetensors)")
    add_progress_flag(p)
    if method in available() + backbone_trainers():
        add_dataclass_args(p, params_class(method), title=f"{method} hyper-parameters")
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "train"), _argv=argv)


def check_outputs(args: argparse.Namespace, params) -> None:
    """--out (or its default) and --checkpoint-dir writable before any training starts."""
    from insightad.apps.train import default_model_path
    from insightad.outputs import check_output_dir, check_output_file

    args.out = str(check_output_file(args.out or default_model_path(args.data, args.method), "--out"))
    if getattr(params, "checkpoint_dir", None):
        check_output_dir(params.checkpoint_dir, "--checkpoint-dir")


def run(args: argparse.Namespace) -> int:
    from insightad.apps.train import train_model

    if args.method in backbone_trainers():
        return run_backbone(args)
    cls = get_class(args.method)
    params = gather(args, cls.Params)
    check_outputs(args, params)
    with warnings_as_lines():
        det, path, split = train_model(args.data, args.method, vars(params), data_params(args), args.out,
                                       args.progress)
    held = f", {len(split['holdout'])} normal images held out" if split["holdout"] else ""
    print(f"trained {args.method} on {len(split['train'])} normal images of {split['root']} "
          f"({split['layout']} layout{held}) in {det.fit_seconds_:.1f} s")
    if getattr(det, "training_", None) is not None:
        _print_training(det.training_)
    print(f"default threshold {det.threshold_:.6g} ({det.threshold_strategy_})")
    print(f"model written to {path}")
    sys.stdout.flush()
    return 0


def _print_training(result) -> None:
    """Epochs run, best epoch, where the checkpoint and curves are (shared training loop)."""
    best = f", best epoch {result.best_epoch}" if result.best_epoch else ""
    early = ", stopped early" if result.stopped_early else ""
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    print(f"training: {result.epochs_run} epochs{best}{early}{resumed}")
    if result.checkpoint:
        print(f"checkpoint and curves in {result.checkpoint.parent}")


def run_backbone(args: argparse.Namespace) -> int:
    """``--method ssl``: train a backbone and write a backbone file (not a detector)."""
    import warnings

    from insightad.apps.train import train_backbone

    params = gather(args, params_class(args.method))
    check_outputs(args, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, path, split = train_backbone(args.data, args.method, vars(params), data_params(args), args.out,
                                              args.progress)
    r = trainer.result_
    print(f"trained {args.method} backbone {trainer.spec_.arch} (init {params.init}) on {trainer.n_train_} "
          f"normal images of {split['root']} ({split['layout']} layout) in {r.seconds:.1f} s")
    _print_training(r)
    where = f"{trainer.n_val_} held-out images" if trainer.heldout_ else "the training images (no held-out split)"
    print(f"rotation accuracy {trainer.accuracy_:.3f} on {where} (chance 0.25)")
    print(f"backbone written to {path}; use it with --backbone ssl:{path}")
    sys.stdout.flush()
    for w in caught:
        print(f"insightad: warning: {w.message}", file=sys.stderr)
    return 0
