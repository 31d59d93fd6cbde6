"""insightad batch: score every image of a folder, list or glob into a resumable Parquet table, here or on Ray."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from insightad.apps.batch_store import ResultsStore


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "batch", "score many images into a Parquet table, in this process or on a Ray cluster",
                   "Score every image of --input (a folder, searched recursively; a text file of paths, one a "
                   "line; or a glob) and write one row per input to --out (Parquet): path, path_bytes (the exact "
                   "bytes of the name), score, score_normalized, anomalous, threshold, error, model_sha256, time, map, "
                   "overlay, and the file's size and mtime_ns. "
                   "An unreadable image is an error row and the exit code is 1. Rows are committed chunk by chunk: "
                   "an interrupted run started again with the same --out skips what is done (by path and model "
                   "file hash), and never writes a row twice; a row without the --maps/--overlays asked for is "
                   "scored again. --ray local starts Ray on this machine; --ray "
                   "auto|HOST:PORT joins a running cluster (see docs/scale.md).")
    add_model_flag(p)
    p.add_argument("--input", required=True, metavar="SOURCE", type=path_arg,
                   help="folder of images (recursive), text file of image paths (one a line, relative ones from the "
                   "file's folder; blank lines and lines starting with # are skipped, unless such a line names an "
                   "existing file), or a glob such as 'dir/**/*.png'")
    p.add_argument("--out", "--output", dest="out", required=True, metavar="RESULTS.parquet", type=path_arg,
                   help="Parquet results table (resumable)")
    p.add_argument("--csv", metavar="FILE.csv", type=path_arg,
                   help="also write the results as CSV (without path_bytes; a cell a spreadsheet would run as a "
                   "formula is written after a ')")
    p.add_argument("--maps", metavar="DIR", type=path_arg, help="write each image's anomaly map as <name>.map.npy (float32) here")
    p.add_argument("--overlays", metavar="DIR", type=path_arg, help="write each image's overlay as <name>.overlay.png here")
    p.add_argument("--threshold", metavar="VALUE|FILE.json", type=path_arg, help="override the model's threshold")
    p.add_argument("--chunk", type=positive_int, default=64, metavar="N",
                   help="images per committed chunk (and per Ray task) (default: 64)")
    p.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="run on Ray: 'local' starts it here, 'auto' or HOST:PORT joins a running cluster")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N", help="Ray actors, one model each (default: 2)")
    p.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N",
                   help="CPUs a --ray local instance may use (default: all cores)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs per Ray actor; > 0 runs the PyTorch engine on CUDA (default: 0, ONNX Runtime on CPU)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_engine_flags(p)
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "batch"), _argv=argv)


def check_folders(folders: dict[str, str], store: ResultsStore, model: str, images: list[str]) -> None:
    """--maps and --overlays refused before any work: not the model, --out, --csv or the results' own files,
    not a file, and apart from every input image's folder (they would overwrite an image or become one)."""
    from insightad.outputs import check_apart

    taken = {"--out": store.out, "--csv": store.csv, "the model": Path(model), "--out's parts": store.parts_dir,
             "--out's lock": store.lock_path, "--csv's lock": store.csv_lock_path}
    for flag, d in folders.items():
        where = Path(d).expanduser().resolve()
        for what, p in taken.items():
            if p is not None and where == Path(p).expanduser().resolve():
                raise InsightADError(f"{d}: {flag} must not be {what} ({p}); choose another folder")
        if Path(d).exists() and not Path(d).is_dir():
            raise InsightADError(f"{flag} {d}: expected a folder, got a file")
        check_apart(d, flag, images)


def run(args: argparse.Namespace) -> int:
    try:
        import pyarrow  # noqa: F401 - the results are Parquet
    except ImportError:
        raise InsightADError("batch writes Parquet and needs pyarrow: pip install 'insightad[batch]'") from None
    from insightad.apps.batch import BatchJob, ResultsStore, list_source, run_local
    from insightad.apps.batch_sources import source_inputs
    from insightad.data.images import not_scored_note
    from insightad.outputs import check_output_dir

    if args.gpus_per_worker < 0:
        raise InsightADError(f"--gpus-per-worker: expected 0 or more, got {args.gpus_per_worker}")
    if args.ray:
        from insightad.apps.batch_ray import import_ray

        import_ray()  # before any work: say how to install it
    if not Path(args.model).is_file():
        raise InsightADError(f"{args.model}: model file not found")
    source = list_source(args.input)  # first: the outputs must not overwrite an input or lie inside its folder
    note = not_scored_note(args.input, source.not_images, "list them in a text file (--input) to score them "
                           "whatever their names")
    if note:
        print(f"insightad: note: {note}", file=sys.stderr)
    if source.repeats:
        lines = "1 line names" if source.repeats == 1 else f"{source.repeats} lines name"
        print(f"insightad: note: {args.input}: {lines} an image listed before (the same path once normalised); each "
              "image is scored once, in one row", file=sys.stderr)
    inputs = [args.model, *source_inputs(args.input, source)]
    store = ResultsStore(Path(args.out), Path(args.csv) if args.csv else None)
    store.check(inputs)
    folders = {f"--{flag}": getattr(args, flag) for flag in ("maps", "overlays") if getattr(args, flag)}
    check_folders(folders, store, args.model, source_inputs(args.input, source, lists=False))
    thr = parse_threshold(args.threshold, args.model)  # a threshold file of another model is refused
    det = load_inference_model(args)
    if args.maps and not det.has_maps:
        raise InsightADError(f"--maps: {det.method} models give no anomaly maps (train padim, patchcore or autoencoder)")
    for flag, d in folders.items():  # after the refusal above: a refused run leaves no empty folder behind
        check_output_dir(d, flag)
    job = BatchJob(Path(args.model), source, store, thr, args.maps, args.overlays, args.chunk, args.progress)
    threshold = float(det.threshold_ if thr is None else thr)
    try:
        if args.ray:
            from insightad.apps.batch_ray import run_ray

            del det  # the actors load their own copy
            s = run_ray(job, threshold, args.ray, args.workers, args.ray_cpus, args.gpus_per_worker, args.engine)
        else:
            s = run_local(job, det)
    except KeyboardInterrupt:
        print(f"insightad: batch interrupted; run the same command again to finish (finished chunks are kept in "
              f"{store.parts_dir})", file=sys.stderr)
        raise
    if args.json:
        print_json({**s.as_dict(), "threshold": threshold, "model_sha256": job.model_sha256})
    else:
        where = f" on Ray ({args.ray}, {args.workers} workers; start-up {s.startup_seconds:.1f} s)" if args.ray else ""
        print(f"scored {s.scored} images in {s.seconds:.1f} s ({s.images_per_second:.1f} images/s){where}; "
              f"{s.skipped} done by an earlier run (unchanged since)"
              + (f", {s.retried} error rows tried again" if s.retried else "")
              + (f", {s.changed} changed since an earlier run scored them" if s.changed else "")
              + (f", {s.refreshed} scored again to write the maps/overlays asked for" if s.refreshed else ""))
        print(f"{s.inputs} inputs: {s.inputs - s.errors - s.anomalous} normal, {s.anomalous} anomalous, "
              f"{s.errors} errors (threshold {threshold:.6g}); results in {store.out}"
              + (f" and {store.csv}" if store.csv else ""))
    for e in s.error_examples:
        print(f"  error: {e}", file=sys.stderr)
    if s.errors:
        print(f"insightad: {s.errors} of {s.inputs} inputs could not be scored (error rows in {store.out})",
              file=sys.stderr)
        return 1
    return 0
