"""Issue 49: the README and docs/ followed literally by a new user; where the product disagreed with a page that
described the better behaviour, the product was changed, and each change is checked here."""

from __future__ import annotations

import argparse

from insightad.cli import _parse, build_parser


def parsed(*argv: str) -> argparse.Namespace:
    """The command line as ``insightad`` parses it (no sub-command run)."""
    return _parse(build_parser(list(argv)), list(argv))


def test_train_ray_workers_do_not_become_the_models_decoding_threads():
    """train --workers is the number of Ray workers; the detector's own ``workers`` (image-decoding threads,
    -1: automatic) kept its default instead of taking the Ray flag's 2 (stored in every model file)."""
    from insightad.apps.train import params_class
    from insightad.cli.options import gather

    args = parsed("train", "--method", "baseline", "--data", "x", "--workers", "5")
    assert args.ray_workers == 5
    assert gather(args, params_class("baseline")).workers == -1
    assert gather(parsed("train", "--data", "x"), params_class("baseline")).workers == -1


def test_predict_takes_batch_spelling_of_overlays():
    """batch writes overlays with --overlays; predict refused that spelling of its --overlay ('unrecognized
    arguments'), so a user moving from one command to the other tripped on one letter."""
    assert parsed("predict", "--model", "m.safetensors", "--overlays", "ov", "a.png").overlay == "ov"
    assert parsed("batch", "--model", "m.safetensors", "--input", "x", "--out", "r.parquet",
                  "--overlay", "ov").overlays == "ov"
