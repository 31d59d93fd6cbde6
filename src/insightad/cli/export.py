"""insightad export: one ONNX graph (decoded uint8 images in, scores and maps out) verified against PyTorch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from insightad.cli.common import add_model_flag, new_parser, with_config
from insightad.cli.options import path_arg
from insightad.errors import InsightADError


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "export", "export a model file to ONNX (for ONNX Runtime, any language)",
                   "Write one ONNX graph that takes decoded uint8 images at their own size (N x C x H x W, "
                   "any batch size, any H and W) and returns image scores and, for methods with maps, "
                   "anomaly maps at the model's size; resize and normalisation are inside. The threshold, "
                   "score scale, input size and decode contract travel in the ONNX metadata (docs/onnx.md). "
                   "The export is checked against PyTorch (1e-4 relative) before it is written.")
    add_model_flag(p)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--out", "--output", dest="out", metavar="FILE.onnx", type=path_arg,
                   help="file to write (default: the model path with .onnx)")
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "export"), _argv=argv)


def run(args: argparse.Namespace) -> int:
    from insightad.engines.onnx_runtime import is_onnx_file
    from insightad.inference.export import beside, check_graph_output
    from insightad.io import output_lock, require_file
    from insightad.outputs import check_output_file

    require_file(args.model, "model file")  # a missing name or a folder is not 'already an ONNX graph'
    if is_onnx_file(args.model):
        raise InsightADError(f"{args.model}: already an ONNX graph; export takes the model file it was made from "
                             "(.safetensors), and the graph itself can be copied and used as it is")
    out = args.out if args.out else Path(args.model).with_suffix(".onnx")
    out = check_output_file(out, "--out", suffix=".onnx", inputs=[args.model])  # never over the model file
    check_graph_output(out, args.model)
    # Every writer of one graph holds one lock, so a second is refused at once. The graph beside the model file is
    # train's and calibrate's to write too: under the model file's lock (a graph of the old model written over the
    # new model's once it finished, otherwise). Any other --out under its own OUT.lock: two exports (of two models)
    # to one name each said it had written its graph there, and one graph silently replaced the other. A reader
    # (predict, serve) takes no lock: the graph is replaced by a rename, so it reads the old file or the new one.
    own = {os.path.realpath(beside(m)) for m in (args.model, os.path.realpath(args.model))}
    with output_lock(args.model if os.path.realpath(out) in own else out, "--out"):
        return _export(args, out)


def _export(args: argparse.Namespace, out: Path) -> int:
    """Read the model file (unchanged while read), write its graph to ``out`` and say so."""
    from insightad.inference.export import export_onnx
    from insightad.io import file_sha256
    from insightad.model_file import load_model

    # Stamped with the sha256 of the file it was made from: beside its model file, predict uses it. Hashed once
    # the model was read, a train or calibrate rewriting the file meanwhile had the old model's graph stamped as
    # the new model's (predict then scored with the old model's threshold); the file must not change while read.
    digest = file_sha256(args.model)
    det = load_model(args.model)
    if file_sha256(args.model) != digest:
        raise InsightADError(f"{args.model}: changed while export read it (a train or calibrate writing it); "
                             "nothing was written: run export again once it has finished")
    export_onnx(det, out, digest, release=True)  # the model is not used again: its tensors go before the check
    p = det.preprocessing_
    print(f"exported {det.method} to {out} (input uint8 N x {p.channels} x H x W at the image's own size, resized "
          f"inside to {p.size[0]}x{p.size[1]}; threshold {det.threshold_:.6g}; verified against PyTorch)")
    return 0
