"""Pieces several sub-commands share: data flags, config-file handling, printing, threshold overrides."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from insightad import config
from insightad.cli.options import add_config_flag, add_dataclass_args, apply_config, load_config_file, path_arg
from insightad.errors import InsightADError
from insightad.io import UNSIGNED_NUMBER

# Every spelling of a negative number Python's float() reads: argparse knows only -5 and -0.5, so
# ``--threshold -1e-3`` or ``--threshold -inf`` stopped with "expected one argument" instead of being read.
NEGATIVE_NUMBER = re.compile(rf"^-{UNSIGNED_NUMBER}$", re.IGNORECASE)


def new_parser(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None
               ) -> argparse.ArgumentParser:
    """A sub-command's parser, with --config, that reads every negative number as a value, never as a flag."""
    p = sub.add_parser(name, help=help, description=description or help)
    p._negative_number_matcher = NEGATIVE_NUMBER  # no flag of ours looks like a number: words like these are values
    add_config_flag(p)
    return p


def add_data_flags(p: argparse.ArgumentParser, *, data_required: bool = True, seed_help: str | None = None) -> None:
    """--data and the layout flags. ``seed_help`` marks a command that scores a trained model (calibrate, evaluate):
    its split is the one recorded in the model file, so --holdout says that it does nothing there, and --seed
    says what it does (``seed_help``, '' for nothing)."""
    p.add_argument("--data", "--data-path", "--data_path", dest="data", required=data_required, metavar="PATH", type=path_arg,
                   help="dataset folder (MVTec AD category, normal/abnormal folders, crack set, or a folder of images)")
    add_dataclass_args(p, config.DataParams, title="data")
    if seed_help is None:
        return
    for a in p._actions:
        if a.dest == "holdout":
            a.help = ("train's hold-out fraction, not used here: on the dataset the model was trained on, the split "
                      "recorded in the model file is used, and on another path no image is held out")
        elif a.dest == "seed":
            a.help = seed_help or "train's seed, not used here"


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="MODEL", type=path_arg,
                   help="model file written by 'insightad train'")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """--engine, --threads, --device: how a loaded model runs (same scores within 1e-4 across engines)."""
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="inference engine (auto: PyTorch on a CUDA GPU when --device gives one, else ONNX Runtime "
                   "on the CPU when installed, else PyTorch) (default: auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when present, else the CPU), cpu or cuda; "
                   "the same default as train and serve (default: auto)")


def add_work_flags(p: argparse.ArgumentParser) -> None:
    """--tile, --overlap, --search: how a loaded model works, when it should differ from how it was trained."""
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tiles per side for tiled work (small defects in large images; 1: none); default: as trained. "
                   "Runs on PyTorch; the threshold stays the one chosen at training")
    p.add_argument("--overlap", type=float, default=None, metavar="F", help="fraction of a tile shared with its "
                   "neighbour (with --tile); default: as trained")
    p.add_argument("--search", default=None, choices=["auto", "hnsw", "exact"],
                   help="PatchCore's nearest-neighbour search (hnsw: approximate, faiss; exact); default: as trained")


def at_most_cores(threads: int, flag: str) -> int:
    """``threads``, or the machine's CPU core count with a one-line warning naming ``flag`` where it asks for
    more: ``--threads 100000`` had the process killed for memory with no message."""
    cores = os.cpu_count() or 1
    if threads > cores:
        warnings.warn(f"{flag} {threads} is more than the {cores} CPU cores of this machine; using {cores}",
                      stacklevel=2)
        return cores
    return threads


def load_inference_model(args: argparse.Namespace):
    from insightad.inference.load import load_for_inference

    if args.threads is not None and args.threads < 1:
        raise InsightADError(f"--threads: expected a positive number, got {args.threads}")
    if args.threads is not None:
        args.threads = at_most_cores(args.threads, "--threads")
    tile, overlap, search = (getattr(args, k, None) for k in ("tile", "overlap", "search"))
    if tile is None and overlap is None and search is None:
        return load_for_inference(args.model, args.engine, args.threads, args.device)
    check_rework(args)
    from insightad.methods.base import Detector

    det = load_for_inference(args.model, "torch", args.threads, args.device)
    assert isinstance(det, Detector)  # the torch engine gives the PyTorch detector
    if search is not None:
        from insightad.methods.components.knn import resolve_search

        inner: Any = getattr(det.model_, "inner", det.model_)
        if not hasattr(inner, "search"):
            raise InsightADError(f"--search: only patchcore models search a memory bank ({args.model} is "
                                 f"{det.method})")
        det.set_params(search=search)
        inner.search = resolve_search(search)
    if tile is not None or overlap is not None:
        from insightad.methods import tiling

        tiling.retile(det, tile, overlap)
    return det


def check_rework(args: argparse.Namespace) -> None:
    """--tile/--overlap/--search rebuild the PyTorch model of a model file: refused in one line for an ONNX export
    (it was 'drop --engine torch', a flag not given), --engine onnx, and an install without PyTorch (a traceback)."""
    from insightad.engines.onnx_runtime import is_onnx_file
    from insightad.runtime import TRAIN_EXTRA, torch_available

    flags = "--tile/--overlap/--search change the model's graph"
    if is_onnx_file(args.model):
        raise InsightADError(f"{args.model}: {flags}, and an ONNX export is a fixed graph: give the model file "
                             "(.safetensors; they run on PyTorch), or export a model trained with them")
    if args.engine == "onnx":
        raise InsightADError(f"{flags}: they run on --engine torch (export a model trained with them for ONNX Runtime)")
    if not torch_available():
        raise InsightADError(f"{flags}, which needs PyTorch; this install does not have it: {TRAIN_EXTRA}")


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (workers, CPUs, chunk sizes): 0 would hang or do nothing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="show progress bars (default: when the terminal is interactive)")


def with_config(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str,
                shown: str | None = None) -> argparse.Namespace:
    """Re-parse with the config file's values as defaults, so that flags override the file. ``shown``: the
    command as the messages name it where its options depend on more than its name (``train --method padim``)."""
    if not getattr(args, "config", None):
        return args
    cfg = load_config_file(args.config, command)
    apply_config(parser, cfg, args.config, command, shown)
    return parser.parse_args(args._argv)


def data_params(args: argparse.Namespace) -> config.DataParams:
    from insightad.cli.options import gather

    return gather(args, config.DataParams)


def parse_threshold(value: str | None, model: str | Path | None = None) -> float | None:
    """``--threshold`` as a number or a JSON threshold file (from calibrate or the web page's export);
    a file made for another model than ``model`` is refused, pickle files are refused."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        return _finite_threshold(number, f"--threshold: expected a finite number, got {value!r}")
    path = Path(value)
    if path.suffix.lower() in (".pkl", ".pickle", ".joblib"):
        raise InsightADError(f"{path}: pickle threshold files are refused (loading one can run arbitrary code); "
                             "pass a number or the JSON file from 'insightad calibrate --out'")
    if not path.exists():
        raise InsightADError(f"--threshold: expected a number or a JSON file, got {value!r} (no such file)")
    if not path.is_file():  # a folder, a FIFO (reading it would block) or a device
        raise InsightADError(f"--threshold: {value!r} is not a regular file; expected a number or a JSON file")
    from insightad.apps.threshold_file import read_threshold_file

    return read_threshold_file(path, model)


def _finite_threshold(number: float, message: str) -> float:
    """NaN or infinity would make every image normal (or every one anomalous): refused."""
    if not math.isfinite(number):
        raise InsightADError(message)
    return number


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Warnings raised meanwhile (a long CPU run, constant scores, a stale graph beside the model) are
    printed at once as one ``insightad: warning: ...`` line each, not as Python's two-line warning with a
    source path; the same message raised again from another place is printed once. ``main`` runs every
    sub-command inside it."""
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message) not in said:
            said.add(str(message))
            print(f"insightad: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager, ``kill``, a cluster scheduler) stops the command like Ctrl-C for the duration:
    the work unwinds (temporaries removed, checkpoints or finished chunks kept) and says how to resume, instead of
    the process dying mid-write. The previous handler is restored after (a caller in the same process)."""
    import signal
    import threading

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_graph_lines(lines: list[str], quiet: bool = False) -> None:
    """Lines about the ONNX graphs a command wrote: warnings to stderr as ``insightad: warning:`` lines (as every
    other warning), the others to stdout unless ``quiet`` (--json)."""
    for line in lines:
        if line.startswith("warning: "):
            print(f"insightad: {line}", file=sys.stderr)
        elif not quiet:
            print(line)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
