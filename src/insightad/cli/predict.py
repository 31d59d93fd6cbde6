"""insightad predict: score images with a model file; a table, or JSON lines with --json."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from insightad.cli.common import (
    add_engine_flags,
    add_model_flag,
    add_progress_flag,
    add_work_flags,
    load_inference_model,
    new_parser,
    parse_threshold,
    print_json,
    with_config,
)
from insightad.cli.options import path_arg
from insightad.data.images import not_scored_note
from insightad.errors import InsightADError
from insightad.io import folder_lock, is_regular_file, list_images


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "predict", "score images (a decision and raw score per image)")
    add_model_flag(p)
    p.add_argument("images", nargs="*", metavar="IMAGE", type=path_arg, help="image files or folders of images")
    p.add_argument("--image", action="append", default=[], metavar="IMAGE", type=path_arg, help="an image (repeatable)")
    p.add_argument("--threshold", metavar="VALUE|FILE.json", type=path_arg, help="override the model's threshold")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--overlay", "--overlays", "--output-overlay", "--output_overlay", dest="overlay", metavar="DIR",
                   type=path_arg,
                   help="write <stem>_overlay.png per image into DIR: heatmap and defect outline for methods "
                   "with maps, score and verdict for all (--overlays: batch's name for it)")
    p.add_argument("--heatmap", metavar="DIR", type=path_arg, help="write <stem>_heatmap.png per image into DIR (map methods)")
    add_engine_flags(p)
    add_work_flags(p)
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "predict"), _argv=argv)


def expand_images(items: list[str]) -> list[Path]:
    """Files as given; folders expanded to their images (sorted). Missing paths are errors."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            skipped: list[Path] = []
            found = list_images(path, skipped=skipped)
            if not found:
                raise InsightADError(f"{path}: no images found in this folder")
            out.extend(found)
            note = not_scored_note(path, skipped, "pass a file by its path to score it whatever its name")
            if note:
                print(f"insightad: note: {note}", file=sys.stderr)
        elif path.exists() and not is_regular_file(path):  # a FIFO would block the reader forever
            raise InsightADError(f"{path}: not a regular file (a pipe, socket or device); expected an image file")
        elif path.exists():
            out.append(path)
        else:
            raise InsightADError(f"{path}: no such file or folder")
    if not out:
        raise InsightADError("predict: no images given (pass IMAGE paths or --image)")
    return out


def check_outputs(args: argparse.Namespace, given: list[str], paths: list[Path]) -> None:
    """--overlay and --heatmap refused before any work: apart from every input's folder, neither on the way
    to the other, and no file name of theirs an existing folder."""
    from insightad.outputs import check_apart, check_output_dir, check_output_names
    from insightad.render.names import output_names

    dirs = {f: d for f, d in (("--overlay", args.overlay), ("--heatmap", args.heatmap)) if d}
    for flag, d in dirs.items():  # never beside or above an input: the next run would score the outputs
        check_apart(d, flag, given)
        if os.path.lexists(d) and not os.path.isdir(d):
            check_output_dir(d, flag)  # its one line: a file, not a folder
    for flag, d in dirs.items():
        kind = flag.lstrip("-")
        check_output_names(d, output_names(paths, kind), flag, [(o, f) for f, o in dirs.items() if f != flag])
    if args.overlay:
        check_output_dir(args.overlay, "--overlay")


def run(args: argparse.Namespace) -> int:
    from insightad.outputs import check_output_dir

    given = list(args.images) + list(args.image)
    paths = expand_images(given)
    check_outputs(args, given, paths)
    thr = parse_threshold(args.threshold, args.model)  # a wrong threshold file fails before the model loads
    det = load_inference_model(args)
    if args.heatmap and not det.has_maps:
        raise InsightADError(f"--heatmap: {det.method} models give no anomaly maps (train padim, patchcore "
                             "or autoencoder)")
    if args.heatmap:  # after the refusal above, so that a refused run leaves no empty folder behind
        check_output_dir(args.heatmap, "--heatmap")
    with output_folder_locks(args):
        return _predict(args, det, paths, thr)


def output_folder_locks(args: argparse.Namespace) -> contextlib.ExitStack:
    """Lock --overlay and --heatmap (each folder once): two runs given one folder wrote the same
    ``<stem>_overlay.png`` names, so one run's table or JSON named pictures the other run had drawn."""
    given = (("--overlay", args.overlay), ("--heatmap", args.heatmap))
    folders = {os.path.realpath(d): (flag, d) for flag, d in given if d}  # one folder given to both: locked once
    locks = contextlib.ExitStack()
    with contextlib.ExitStack() as taking:  # a refused second folder releases the first
        taking.enter_context(locks)
        for flag, folder in folders.values():
            locks.enter_context(folder_lock(folder, "run", flag))
        taking.pop_all()
    return locks


def _predict(args: argparse.Namespace, det, paths: list[Path], thr) -> int:
    """Score ``paths`` (overlays and heatmaps written, their folders locked) and print the results."""
    overlays: list = [None] * len(paths)
    if args.overlay:
        from insightad.render.overlay import predict_with_overlays

        pred, overlays = predict_with_overlays(det, paths, args.overlay, thr, progress=args.progress, strict=False)
    heatmaps: list[Path | None] = [None] * len(paths)
    if args.heatmap or not args.overlay:  # overlays hold maps a chunk at a time; heatmaps need them all
        pred = det.predict(paths, maps=bool(args.heatmap), progress=args.progress, threshold=thr, strict=False)
    if args.heatmap:
        from insightad.render.colormap import MapScale
        from insightad.render.heatmap import write_heatmaps

        heatmaps = write_heatmaps(paths, pred.maps, MapScale.for_detector(det, thr), args.heatmap)
    if args.json:
        for i, (path, ov, hm) in enumerate(zip(paths, overlays, heatmaps)):
            row = {"path": str(path), **pred.record(i), "method": det.method}
            if ov is not None:
                row["overlay"] = str(ov)
            if hm is not None:
                row["heatmap"] = str(hm)
            print_json(row)
    else:
        print_table(paths, pred)
        if args.overlay:
            print(f"{count_files(overlays)} overlays written to {args.overlay}")
        if args.heatmap:
            print(f"{count_files(heatmaps)} heatmaps written to {args.heatmap}")
    return report_errors(pred.errors, len(paths))


def count_files(written: list) -> int:
    """The files written, each once (an image given twice is one file, not two)."""
    return len({os.path.realpath(p) for p in written if p is not None})


def print_table(paths, pred) -> None:
    width = max(len(str(p)) for p in paths)
    print(f"{'image':<{width}}  {'score':>12}  {'normalized':>10}  verdict   (threshold {pred.threshold:.6g})")
    for i, (path, s, sn, lab) in enumerate(zip(paths, pred.scores, pred.scores_normalized, pred.labels)):
        verdict = "ERROR" if i in pred.errors else ("ANOMALOUS" if lab else "normal")
        print(f"{str(path):<{width}}  {s:>12.6g}  {sn:>10.4f}  {verdict}")


def report_errors(errors: dict[int, str], n: int) -> int:
    """The images that could not be scored, on stderr after the results; non-zero exit when there are any."""
    for i in sorted(errors):
        print(f"insightad: error: {errors[i]}", file=sys.stderr)
    if errors:
        print(f"insightad: {len(errors)} of {n} images could not be scored (listed above)", file=sys.stderr)
        return 1
    return 0
