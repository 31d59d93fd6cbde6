"""insightad info: what a file this tool wrote holds: a model file (method, backbone, preprocessing,
threshold, split), an ONNX export (its InsightAD metadata) or an ssl backbone file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from insightad.cli.common import add_model_flag, new_parser, print_json, with_config
from insightad.errors import InsightADError


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "info", "show what a model file, ONNX export or backbone file holds (no tensors loaded)")
    add_model_flag(p)
    p.add_argument("--full", action="store_true", help="include the lists of training and held-out files and their "
                   "sha256 (else counted)")
    p.add_argument("--json", action="store_true", help="one JSON object (what info always prints; accepted as the "
                   "other commands accept it)")
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "info"), _argv=argv)


def _short_split(meta: dict[str, Any]) -> None:
    """The split's lists counted, not listed: the file names and their sha256 (one per training image) flooded
    the output without --full."""
    split = meta.get("split")
    if isinstance(split, dict):
        split = dict(split)
        for key, value in split.items():
            if isinstance(value, list):
                split[key] = f"{len(value)} {'hashes' if key.endswith('sha256') else 'files'}"
        meta["split"] = split


def describe(path: str | Path) -> dict[str, Any]:
    """The metadata of a model file, an InsightAD ONNX export (``file: onnx-export``) or an ssl backbone
    file (``file: backbone``); for anything else, the model file's own one-line refusal."""
    from insightad.engines.onnx_runtime import is_onnx_file
    from insightad.model_file import read_metadata

    if is_onnx_file(path):
        from insightad.engines.onnx_runtime import read_onnx_metadata
        from insightad.model_schema import validate_onnx_metadata

        return {"file": "onnx-export", **validate_onnx_metadata(read_onnx_metadata(path), str(path))}
    try:
        return read_metadata(path)
    except InsightADError as model_error:
        from insightad.backbones.registry import read_backbone_file_meta

        try:
            meta = read_backbone_file_meta(Path(path))
        except (InsightADError, ValueError):
            raise model_error from None
        if not isinstance(meta, dict):
            raise model_error from None
        return {"file": "backbone", **meta}


def run(args: argparse.Namespace) -> int:
    meta = describe(args.model)
    if not args.full:
        _short_split(meta)
    print_json(meta)
    return 0
