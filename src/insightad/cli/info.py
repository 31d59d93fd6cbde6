"""insightad info: what a model file holds (method, backbone, preprocessing, threshold, split)."""

from __future__ import annotations

import argparse

from insightad.cli.common import add_model_flag, new_parser, print_json, with_config


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "info", "show a model file's metadata (no tensors loaded)")
    add_model_flag(p)
    p.add_argument("--full", action="store_true", help="include the lists of training and held-out files")
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "info"), _argv=argv)


def run(args: argparse.Namespace) -> int:
    from insightad.model_file import read_metadata

    meta = read_metadata(args.model)
    if not args.full and meta.get("split"):
        split = dict(meta["split"])
        split["train"], split["holdout"] = f"{len(split['train'])} files", f"{len(split['holdout'])} files"
        meta["split"] = split
    print_json(meta)
    return 0
