"""insightad train: fit a method on the normal images of a dataset and write one model file."""

from __future__ import annotations

import argparse
import sys

from insightad.cli.common import add_data_flags, add_progress_flag, data_params, new_parser, with_config
from insightad.cli.options import add_dataclass_args, gather, load_config_file
from insightad.methods import available, get_class


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
                   "(recorded in the model file) for calibrate and evaluate. Method-specific flags are "
                   "listed by 'insightad train --method NAME --help'.")
    p.add_argument("--method", "--mode", dest="method", default="baseline", choices=available(),
                   help="detection method")
    add_data_flags(p)
    p.add_argument("--out", "--output", dest="out", metavar="MODEL",
                   help="model file to write (default: models/<data>-<method>.safetensors)")
    add_progress_flag(p)
    if method in available():
        add_dataclass_args(p, get_class(method).Params, title=f"{method} hyper-parameters")
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "train"), _argv=argv)


def run(args: argparse.Namespace) -> int:
    from insightad.apps.train import train_model

    cls = get_class(args.method)
    params = gather(args, cls.Params)
    det, path, split = train_model(args.data, args.method, vars(params), data_params(args), args.out, args.progress)
    held = f", {len(split['holdout'])} normal images held out" if split["holdout"] else ""
    print(f"trained {args.method} on {len(split['train'])} normal images of {split['root']} "
          f"({split['layout']} layout{held}) in {det.fit_seconds_:.1f} s")
    print(f"default threshold {det.threshold_:.6g} ({det.threshold_strategy_})")
    print(f"model written to {path}")
    sys.stdout.flush()
    return 0
