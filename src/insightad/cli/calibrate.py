"""insightad calibrate: choose a decision threshold on images the model was not trained on and keep it
in the model file (rewritten atomically), with how it was chosen; ``--out`` files name the model file by
its sha256, and the ONNX graph beside the model is exported again so that it stays the model's."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from insightad.cli.common import (
    add_data_flags,
    add_engine_flags,
    add_model_flag,
    add_progress_flag,
    data_params,
    load_inference_model,
    new_parser,
    print_graph_lines,
    print_json,
    with_config,
)
from insightad.cli.options import path_arg
from insightad.decide.thresholds import STRATEGIES
from insightad.errors import InsightADError
from insightad.io import output_lock


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "calibrate", "choose the decision threshold and store it in the model file",
                   "Score images the model was not trained on and choose its threshold. percentile: the "
                   "--percentile-th percentile of normal scores (normal images only are needed: the held-out "
                   "normals of the training dataset, or any folder of extra normal images); f1: the threshold "
                   "with the best F1 on labelled normal and defective images; youden: the ROC point with the "
                   "largest TPR - FPR. Training images are refused.")
    add_model_flag(p)
    add_data_flags(p, data_required=False, seed_help="")
    p.add_argument("--labels", metavar="FILE.csv", type=path_arg,
                   help="operator labels instead of --data: columns path,label (images re-scored) or "
                        "name,label,score,model_sha256 (scores taken as given; refused when the hash is not this "
                        "model file's); label is normal or anomalous. Training images of the model are refused; "
                        "an image listed twice with different labels is refused, an exact repeat counts once")
    p.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help="how to choose (default: percentile; f1 with --labels)")
    p.add_argument("--percentile", type=float, default=95.0, metavar="P",
                   help="percentile of normal scores for --strategy percentile (default: 95)")
    p.add_argument("--out", "--output", dest="out", metavar="FILE.json", type=path_arg,
                   help="also write the threshold to this JSON file (for --threshold FILE.json), with the sha256 of "
                        "the model file as calibrate leaves it: refused for any other model")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the threshold without changing the model file")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_engine_flags(p)
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "calibrate"), _argv=argv)


def write_threshold_json(path: Path, model: str, record: dict, model_sha256: str) -> None:
    """The ``--out`` file: the threshold and the sha256 of the model file it belongs to, so ``--threshold
    FILE.json`` refuses it for any other model (``apps.threshold_file``)."""
    import json

    from insightad.io import atomic_write

    body = {"threshold": record["value"], "strategy": record["strategy"], "model": str(Path(model).resolve()),
            "model_sha256": model_sha256, "details": record["details"]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8"))


def store(args: argparse.Namespace, det, record: dict) -> list[str]:
    """Write ``--out`` and the model file (unless --dry-run). ``--out`` names the model file as it will be:
    it is written from the finished new model file just before that replaces the old one, so if it cannot
    be written the model is left as it was. Then the ONNX graph beside the model is refreshed. Returns the
    lines saying what was done to graphs."""
    from insightad.apps import calibrate as cal_mod
    from insightad.io import file_sha256

    out = Path(args.out) if args.out else None
    if args.dry_run:
        if out:
            write_threshold_json(out, args.model, record, file_sha256(args.model))
        return []
    ready = (lambda tmp: write_threshold_json(out, args.model, record, file_sha256(tmp))) if out else None
    mine, others = cal_mod.graphs_beside(args.model)  # before the rewrite: which graph beside is this model's
    cal_mod.apply_record(det, args.model, record, ready)
    return cal_mod.refresh_graphs(args.model, mine, others)


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output whose folder cannot take a new file (it is written through a
    temporary name beside it, so that is what is tried)."""
    import tempfile

    if path.is_dir():
        raise InsightADError(f"{flag} {path}: is a folder; expected a file name")
    folder = path.parent
    if not folder.is_dir():
        raise InsightADError(f"{flag} {path}: the folder {folder} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".insightad-check", dir=folder)
    except OSError as e:
        raise InsightADError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def run(args: argparse.Namespace) -> int:
    if args.out:
        from insightad.apps.threshold_file import check_replaceable
        from insightad.outputs import check_output_file

        check_output_file(args.out, "--out", suffix=".json", inputs=[args.model])
        check_replaceable(args.out, "--out")
    if not 0 <= args.percentile <= 100:
        raise InsightADError(f"--percentile: expected a value between 0 and 100, got {args.percentile:g}")
    from insightad.engines.onnx_runtime import is_onnx_file
    from insightad.io import require_file

    require_file(args.model, "model file")  # a missing name or a folder is not 'an ONNX export'
    if is_onnx_file(args.model):
        raise InsightADError(f"{args.model}: calibrate needs the model file (.safetensors), not an ONNX export "
                             "(export again after calibrating)")
    if bool(args.labels) == bool(args.data):
        raise InsightADError("calibrate: give either --data (images to score) or --labels FILE.csv, not both or neither")
    if args.out:
        check_writable(Path(args.out), "--out")
    if not args.dry_run:
        check_writable(Path(args.model).resolve(), "--model")  # a link: the file it points to is rewritten
    # The model file is read, then rewritten with its graphs: a second calibrate (or a train writing it) between
    # the two would be lost, or leave a graph of the other run beside it. --out under its own lock (--dry-run too):
    # two calibrates (of two models) given one --out each said they had written it, and one file replaced the other.
    with contextlib.ExitStack() as locks:
        if not args.dry_run:
            locks.enter_context(output_lock(args.model, "--model"))
        if args.out:
            locks.enter_context(output_lock(args.out, "--out"))
        return _calibrate(args)


def _calibrate(args: argparse.Namespace) -> int:
    """Load the model, choose its threshold, store it (the model file locked unless --dry-run) and say so."""
    from insightad.apps import calibrate as cal_mod

    det = load_inference_model(args)
    if args.labels:
        return run_labels(args, det)
    args.strategy = args.strategy or "percentile"
    cal = cal_mod.calibrate(det, args.data, data_params(args), args.strategy, args.percentile, args.progress)
    for w in cal.choice.warnings:
        print(f"insightad: warning: {w}", file=sys.stderr)
    old = (det.threshold_, det.threshold_strategy_)
    record = cal.threshold_record()
    graphs = store(args, det, record)
    if args.json:
        print_graph_lines(graphs, quiet=True)
        print_json({**record, "model": args.model, "written": not args.dry_run, "json": args.out, "graphs": graphs})
        return 0
    d = cal.choice.details
    used = ", ".join(f"{n} in {folder}" for folder, n in cal.folders().items())
    print(f"calibrated on {d['n_normal']} normal and {d['n_anomalous']} defective images of {d['data']} ({used})")
    how = {"percentile": lambda: f"{d['percentile']:g}th percentile of normal scores "
                                 f"({d['false_alarm_rate']:.1%} of these normals above it)",
           "f1": lambda: f"best F1 {d['f1']:.4f} (precision {d['precision']:.4f}, recall {d['recall']:.4f})",
           "youden": lambda: f"best Youden J {d['youden_j']:.4f} (TPR {d['tpr']:.4f}, FPR {d['fpr']:.4f})"}
    print(f"threshold {record['value']:.6g}: {how[record['strategy']]()}")
    if "pixel_threshold" in d:
        print(f"pixel outline level {d['pixel_threshold']:.6g} (same strategy on each image's map maximum)")
    print(f"previous threshold {old[0]:.6g} ({old[1]})")
    if args.dry_run:
        print("dry run: the model file was not changed")
    else:
        print(f"stored in {args.model}")
    if args.out:
        print(f"threshold written to {args.out}")
    print_graph_lines(graphs, quiet=False)
    return 0


def run_labels(args: argparse.Namespace, det) -> int:
    """``--labels``: the threshold from operator-labelled images (re-scored, or scores as given)."""
    from insightad.apps import calibrate as cal_mod
    from insightad.decide.labels import check_model_hash, read_labels

    lf = read_labels(args.labels)
    check_model_hash(lf, args.model)
    strategy = args.strategy or "f1"
    if lf.form == "paths":
        paths = cal_mod.labels_samples(det, lf)  # training images refused, as with --data
        scores, _ = cal_mod.score_with_map_max(det, paths, False, progress=args.progress)
    else:
        assert lf.scores is not None  # form "scores": read_labels always fills them
        scores = lf.scores
    record = cal_mod.labels_record(det, lf, scores, strategy, args.percentile)
    for w in record["details"]["warnings"]:
        print(f"insightad: warning: {w}", file=sys.stderr)
    old = (det.threshold_, det.threshold_strategy_)
    graphs = store(args, det, record)
    if args.json:
        print_graph_lines(graphs, quiet=True)
        print_json({**record, "model": args.model, "written": not args.dry_run, "json": args.out, "graphs": graphs})
        return 0
    d = record["details"]
    how = "re-scored" if lf.form == "paths" else "scores as given"
    print(f"calibrated on {d['n_normal']} normal and {d['n_anomalous']} anomalous labelled images of {args.labels} "
          f"({how})")
    print(f"threshold {record['value']:.6g} ({strategy}); on these images: false alarms {d['false_alarm_rate']:.1%}, "
          f"recall {d['recall']:.1%}" if d.get("recall") is not None else
          f"threshold {record['value']:.6g} ({strategy})")
    print(f"previous threshold {old[0]:.6g} ({old[1]}); estimates made at training time no longer apply and "
          "were removed")
    print("dry run: the model file was not changed" if args.dry_run else f"stored in {args.model}")
    if args.out:
        print(f"threshold written to {args.out}")
    print_graph_lines(graphs, quiet=False)
    return 0
