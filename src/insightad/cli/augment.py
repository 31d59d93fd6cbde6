"""insightad augment: enlarge a small set of normal images with random affine transformations."""

from __future__ import annotations

import argparse

from insightad import config
from insightad.cli.common import add_progress_flag, new_parser, with_config
from insightad.cli.options import add_dataclass_args, gather, path_arg


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "augment", "write augmented copies of normal images (rotation, shift, shear, zoom, flip)",
                   "Write --copies augmented versions of every image under --input into --out (same "
                   "sub-folders, <stem>_augNNN names): random rotation, shift, shear, zoom and flips, each "
                   "switchable (0 or --no-hflip turns one off), deterministic by --seed, with a reflected "
                   "border instead of black corners.")
    p.add_argument("--input", "--input-dir", "--input_dir", dest="input", required=True, metavar="DIR", type=path_arg,
                   help="folder of normal images to augment (sub-folders included; required)")
    p.add_argument("--out", "--output", dest="out", required=True, metavar="DIR", type=path_arg,
                   help="folder to write the augmented images into, created if missing (required)")
    p.add_argument("--copies", type=int, default=5, help="augmented copies per image (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--include-originals", action="store_true", help="also copy the original images")
    add_dataclass_args(p, config.AugmentParams, title="transformations")
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "augment"), _argv=argv)


def run(args: argparse.Namespace) -> int:
    from insightad.apps.augment import augment_folder
    from insightad.outputs import check_output_dir

    params = gather(args, config.AugmentParams)
    check_output_dir(args.out, "--out", inputs=[args.input])  # the copies must not become inputs next run
    written = augment_folder(args.input, args.out, args.copies, params, args.seed, args.include_originals,
                             args.progress)
    print(f"wrote {len(written)} images to {args.out}")
    return 0
