"""insightad sort: copy (or move) every image of a folder into normal/ and anomalous/, with a CSV of scores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from insightad.cli.common import (
    add_engine_flags,
    add_model_flag,
    add_progress_flag,
    load_inference_model,
    new_parser,
    parse_threshold,
    positive_int,
    print_json,
    with_config,
)
from insightad.cli.options import path_arg
from insightad.errors import InsightADError


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "sort", "sort a folder of images into normal/ and anomalous/ with a CSV of scores",
                   "Score every image under --input (sub-folders included) in batches and copy it (or --move it) "
                   "to OUT/normal/ or OUT/anomalous/ (keeping its relative path), writing OUT/results.csv with "
                   "path, score, score_normalized, anomalous, decision, destination, error, size and mtime_ns (a "
                   "cell a spreadsheet would run as a formula is written after a '). Unreadable images are listed "
                   "as errors and left in place, and make the exit status 1 (after everything else is sorted). "
                   "An interrupted run started again with the same arguments finishes what it had begun and skips "
                   "what is done: no image is lost or duplicated. A run on the same --out skips only images "
                   "sorted before and unchanged since (same size and modification time); a new file with a "
                   "sorted file's name is sorted (its earlier copy removed, in copy mode), and images that were unreadable are "
                   "tried again; results.csv then keeps only the newest row of each image.")
    add_model_flag(p)
    p.add_argument("--input", "--sort-out", "--sort_out", dest="input", required=True, metavar="DIR", type=path_arg,
                   help="folder of images to sort, the INPUT (--sort-out/--sort_out: the same input folder, the "
                   "name an older script used; not the destination, which is --out)")
    p.add_argument("--out", "--output", dest="out", metavar="DIR", type=path_arg,
                   help="output folder, not inside the input folder (default: <input>_sorted beside it)")
    p.add_argument("--move", action="store_true", help="move the images instead of copying them")
    p.add_argument("--threshold", metavar="VALUE|FILE.json", type=path_arg, help="override the model's threshold")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, metavar="N",
                   help="images scored per batch (default: 32)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="score on Ray (as 'insightad batch --ray'); files are still placed by this process")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N", help="Ray actors for --ray (default: 2)")
    add_engine_flags(p)
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "sort"), _argv=argv)


def default_out(input_dir: str) -> Path:
    src = Path(input_dir).expanduser().resolve()
    return src.with_name(f"{src.name}_sorted")


def run(args: argparse.Namespace) -> int:
    from insightad.apps.sort import FolderSorter, check_folders
    from insightad.data.images import not_scored_note

    if args.batch_size < 1:
        raise InsightADError(f"--batch-size: expected at least 1, got {args.batch_size}")
    out = Path(args.out) if args.out else default_out(args.input)
    thr = parse_threshold(args.threshold, args.model)  # first: checking the folders creates --out
    check_folders(Path(args.input), out)  # before loading the model: a wrong folder fails fast
    scorer = None
    if args.ray:
        from insightad.apps.batch_ray import import_ray

        import_ray()  # before any work: say how to install it
    det = load_inference_model(args)
    if args.ray:
        from insightad.apps.batch_ray import sort_scorer

        scorer = sort_scorer(Path(args.model), float(det.threshold_ if thr is None else thr), args.ray, args.workers,
                             args.batch_size, engine=args.engine)
    sorter = FolderSorter(det, args.input, out, move=args.move, threshold=thr, batch_size=args.batch_size,
                          progress=args.progress, scorer=scorer)
    try:
        s = sorter.run()
    except KeyboardInterrupt:
        print(f"insightad: sort interrupted; run the same command again to finish (nothing is lost: "
              f"{sorter.journal_path.name} and {sorter.csv_path.name} in {sorter.out} record what was done)",
              file=sys.stderr)
        raise
    note = not_scored_note(sorter.src, s.not_images, "left where they are")
    if note:
        print(f"insightad: note: {note}", file=sys.stderr)
    if args.json:
        print_json({**s.as_dict(), "threshold": sorter.threshold})
        return _status(s)
    verb = "moved" if s.move else "copied"
    print(f"sorted {s.processed} images in {s.seconds:.1f} s (threshold {sorter.threshold:.6g}): {s.normal} normal, "
          f"{s.anomalous} anomalous, {s.errors} unreadable (listed as errors, left in place)")
    if s.recovered:
        print(f"finished {s.recovered} images an interrupted run had begun")
    if s.skipped:
        print(f"skipped {s.skipped} images already sorted by an earlier run (unchanged since: same size and "
              "modification time)")
    if s.retried:
        print(f"tried again {s.retried} images an earlier run could not read")
    if s.changed:
        print(f"sorted {s.changed} images that replaced an earlier sorted file of the same name")
    if s.replaced:
        print(f"removed {s.replaced} earlier copies of those images (only the current copy of each is kept; "
              "results.csv keeps the newest row of each image)")
    print(f"{verb} into {s.out}/normal and {s.out}/anomalous; scores in {s.csv}")
    for e in s.error_examples:
        print(f"  error: {e}", file=sys.stderr)
    return _status(s)


def _status(s) -> int:
    """1 when some images could not be read (as predict and batch), after sorting all the others."""
    if s.errors:
        print(f"insightad: {s.errors} images could not be read (error rows in {s.csv}; left in place)",
              file=sys.stderr)
        return 1
    return 0
