"""insightad train: fit a method on the normal images of a dataset and write one model file."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from insightad import config
from insightad.backbones.registry import SSL_FINE_TUNE
from insightad.cli.common import (
    add_data_flags,
    add_progress_flag,
    data_params,
    new_parser,
    positive_int,
    print_graph_lines,
    warnings_as_lines,
    with_config,
)
from insightad.cli.options import add_dataclass_args, gather, load_config_file, path_arg
from insightad.errors import InsightADError
from insightad.io import folder_lock, output_lock


def method_names() -> list[str]:
    from insightad.apps.train import BACKBONE_METHODS
    from insightad.methods import list_methods

    return list_methods() + list(BACKBONE_METHODS)


def _named(argv: list[str]) -> tuple[str | None, str | None, str | None]:
    """(method, backbone, the config file the method came from) as the command line names them, else the config
    file (its [train] table, then its top level; ``mode`` is the method's old name): raw and unchecked, read
    without importing PyTorch."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", "--mode", dest="method")
    pre.add_argument("--backbone")
    pre.add_argument("--config")  # not path_arg: an empty one is refused by train's parser, with train's usage
    known, _ = pre.parse_known_args(argv)
    method, backbone, source = known.method, known.backbone, None
    if known.config and not (method and backbone):
        cfg = load_config_file(path_arg(known.config), "train")
        section, flat = cfg["__section__"], cfg["__flat__"]
        if not method:
            method = section.get("method") or flat.get("method") or flat.get("mode")
            source = known.config if method else None
        backbone = backbone or section.get("backbone", flat.get("backbone"))
    return method, backbone, source


def _method_from(named: tuple[str | None, str | None, str | None]) -> str:
    """The method ``_named`` found on the command line or in the config file, checked: it decides which flags exist."""
    method, _, source = named
    if source and method not in [*method_names(), "auto"]:  # else: "unrecognized arguments: --image-size"
        raise InsightADError(f"{source}: key 'method': expected one of {', '.join(method_names())}, auto; "
                             f"got {json.dumps(method)}")
    return str(method) if method else "baseline"


def _fine_tunes_a_backbone(named: tuple[str | None, str | None, str | None]) -> bool:
    """Whether this run fine-tunes a backbone: ``--method ssl`` or ``--backbone ssl``, on the command line, else in
    the config file (``_named``); known before ``_method_from`` checks the method's name (which imports PyTorch)."""
    method, backbone, _ = named
    return method == "ssl" or backbone == SSL_FINE_TUNE


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    from insightad.runtime import huge_pages_for_tensors

    named = _named(argv)  # the config file read once, for both
    if _fine_tunes_a_backbone(named):
        huge_pages_for_tensors()  # before PyTorch is imported (by _method_from's check of the name, or just below)
    method = _method_from(named)
    from insightad.apps.train import BACKBONE_METHODS, params_class

    p = new_parser(sub, "train", "fit a detector on normal images and write its model file",
                   "Fit a detector on the normal training images of --data and write one model file. "
                   "Where the layout has no test split, --holdout of the normal images are kept aside "
                   "(recorded in the model file) for calibrate and evaluate. '--method ssl' trains a "
                   "backbone instead and writes a backbone file for '--backbone ssl:PATH'. Method-specific "
                   "flags are listed by 'insightad train --method NAME --help'.")
    p.add_argument("--method", "--mode", dest="method", default="baseline",
                   choices=method_names() + ["auto"],
                   help="detection method; auto: fit --candidates within --time-budget and keep the best on "
                        "synthetic defects; ssl: train a backbone")
    add_data_flags(p)
    p.add_argument("--out", "--output", dest="out", metavar="MODEL", type=path_arg,
                   help="model file (ssl: backbone file) to write (default: models/<data>-<method>.safetensors)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the model's ONNX graph beside it (MODEL with .onnx), checked against PyTorch, so "
                        "the onnx engine and a runtime-only install start from it (default: on; --no-onnx skips it)")
    p.add_argument("--report", metavar="DIR", type=path_arg, help="write a train report into DIR: expected false alarms and "
                   "recall, a sheet of synthetic defects with their maps, recall per defect kind (auto: the table)")
    p.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="spread the fit over Ray workers (baseline, padim, patchcore): 'local' starts Ray here, 'auto' or "
                   "HOST:PORT joins a cluster whose nodes all read --data")
    # dest ray_workers: the detectors' own 'workers' (image-decoding threads, automatic) is another setting
    p.add_argument("--workers", dest="ray_workers", type=positive_int, default=2, metavar="N",
                   help="Ray workers for --ray (default: 2)")
    add_progress_flag(p)
    if method in method_names():
        add_dataclass_args(p, params_class(method), title=f"{method} hyper-parameters")
    elif method == "auto":
        add_dataclass_args(p, config.DetectorParams, title="hyper-parameters shared by the candidates")
    if method not in BACKBONE_METHODS:
        add_dataclass_args(p, config.DecisionParams, skip=decision_skip(method), title="the default threshold")
        _say_when_percentile_counts(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "train", f"train --method {method}"), _argv=argv)


def other_methods_flags(extra: list[str], method: str) -> str:
    """For 'unrecognized arguments': which methods take the first unknown flag that another method has
    ('--epochs is a flag of --method autoencoder, svdd, ssl'), since train's flags depend on --method and
    the default is baseline; '' when no method takes it."""
    import dataclasses

    from insightad.apps.train import params_class

    for word in extra:
        flag = word.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        takers = []
        for m in method_names():
            for f in dataclasses.fields(params_class(m)):
                if flag in (f"--{f.name.replace('_', '-')}", f"--{f.name}", *f.metadata.get("aliases", ())):
                    takers.append(m)
                    break
        if takers:
            return (f" ({flag} is a flag of --method {', '.join(takers)}, not of --method {method}: "
                    f"'insightad train --method {takers[0]} --help' lists its flags)")
    return ""


def _say_when_percentile_counts(p: argparse.ArgumentParser) -> None:
    """train replaces the method's own threshold by the out-of-fold one (--threshold-strategy), so the method's
    --threshold-percentile ('this percentile of the training scores') decides nothing unless the strategy is
    percentile, and then of the out-of-fold scores: its help says so (--threshold-percentile 95 changed nothing).
    --method auto has no --threshold-percentile (its candidates keep theirs, 99): --threshold-strategy's help
    names the number instead of a flag it does not have."""
    percentile = any(a.dest == "threshold_percentile" for a in p._actions)
    for a in p._actions:
        if a.dest == "threshold_percentile" and a.help:
            a.help = a.help.replace(" (default:", "; train uses it only with --threshold-strategy percentile, on "
                                    "the out-of-fold normal scores (default:", 1)
        elif a.dest == "threshold_strategy" and a.help and not percentile:  # auto: its candidates' default, 99
            a.help = a.help.replace("the method's --threshold-percentile", "the 99th percentile", 1)


def decision_skip(method: str) -> tuple[str, ...]:
    """The DecisionParams fields only ``--method auto`` takes as flags (any other method's --time-budget is its
    training loop's, 0 meaning none, not auto's budget, which must be above 0); an ensemble's --refit-folds is its
    own (its members are validated inside its fit)."""
    skip = () if method == "auto" else ("candidates", "time_budget")
    return (*skip, "refit_folds") if method == "ensemble" else skip


def check_outputs(args: argparse.Namespace, params) -> None:
    """--out (or its default), the backbone file ``--backbone ssl`` writes beside it, the checkpoint folder and
    --report writable before any training starts, none of them overwriting an input. A model file may lie
    inside --data (``cd data && insightad train --data .`` writes models/ there: not images, never read back
    as data), but not under an image's name; what holds images (the checkpoint's curves, a report) may not."""
    from insightad.apps.train import default_model_path, fine_tuned_backbone_path, with_training_dir
    from insightad.backbones.registry import SSL_FINE_TUNE
    from insightad.io import IMAGE_EXTENSIONS
    from insightad.outputs import check_not_input, check_output_dir, check_output_file

    out = Path(args.out or default_model_path(args.data, args.method))
    if out.suffix.lower() == ".onnx":  # the graph's own name: 'info' could not read it, --onnx would overwrite it
        raise InsightADError(f"--out: expected a model file name, got {str(out)!r} (.onnx is the name of the ONNX "
                             "graph written beside the model); use e.g. .safetensors")
    if out.suffix.lower() in IMAGE_EXTENSIONS:  # would replace an image, or be read as one by the next run
        raise InsightADError(f"--out: expected a model file name, got the image name {str(out)!r}; use e.g. "
                             ".safetensors")
    args.out = str(check_output_file(out, "--out", inputs=train_inputs(args, params)))
    if getattr(params, "backbone", None) == SSL_FINE_TUNE:
        check_output_file(fine_tuned_backbone_path(Path(args.out)), "--backbone ssl (the backbone file beside --out)")
    if args.method in method_names():
        checkpoints = with_training_dir(args.method, vars(params), Path(args.out)).get("checkpoint_dir")
        if checkpoints:  # its curves are PNGs
            check_not_input(checkpoints, "--checkpoint-dir (default: beside --out)", [args.data])
    if getattr(params, "checkpoint_dir", None):
        check_output_dir(params.checkpoint_dir, "--checkpoint-dir")
    if getattr(args, "report", None):
        check_output_dir(args.report, "--report", inputs=[args.data])


def train_inputs(args: argparse.Namespace, params) -> list[str]:
    """The files a training run reads besides --data, which its outputs must not overwrite: the config file,
    the backbone weights file, an ssl: backbone file."""
    backbone = str(getattr(params, "backbone", "") or "")
    found = [getattr(args, "config", None), getattr(params, "weights", None),
             backbone[len("ssl:"):] if backbone.startswith("ssl:") else None]
    return [str(p) for p in found if p]


def run(args: argparse.Namespace) -> int:
    from insightad.apps.train import BACKBONE_METHODS, params_class
    from insightad.runtime import TRAIN_ARENAS, TRAIN_MMAP_THRESHOLD, TRAIN_TRIM_THRESHOLD, pin_mmap_threshold

    if args.method in BACKBONE_METHODS:
        return run_backbone(args)
    pin_mmap_threshold(TRAIN_MMAP_THRESHOLD, TRAIN_TRIM_THRESHOLD, TRAIN_ARENAS)  # lower peak RSS (runtime.pin_mmap_threshold)
    if args.method == "auto":
        given = {k: v for k, v in vars(gather(args, config.DetectorParams)).items()
                 if k in vars(args)}  # only what the user typed: each candidate keeps its own defaults
        check_outputs(args, argparse.Namespace(**given))
    else:
        params = gather(args, params_class(args.method))
        check_outputs(args, params)
        given = vars(params)
    # The model, its graph, checkpoint and report: one run's. --report too (two runs on other model files, one
    # report folder, left a report made of both), from the start: a refusal after the training would lose it.
    report = getattr(args, "report", None)
    with output_lock(args.out), (folder_lock(report, "run", "--report") if report else contextlib.nullcontext()):
        return _train(args, given)


def _train(args: argparse.Namespace, given: dict) -> int:
    """Train, write the model (and its report and graph) and print what was done; --out is locked."""
    from insightad.apps.train import train_model

    decision = gather(args, config.DecisionParams, skip=decision_skip(args.method))
    shards = None
    if args.ray:
        from insightad.apps.train_ray import ray_shards
        from insightad.methods import get_method

        if args.method == "auto" or not get_method(args.method).sharded_fit:
            raise InsightADError(f"--ray: {args.method}'s fit cannot be distributed (baseline, padim and patchcore "
                                 "can); train it without --ray")
        shards = ray_shards(args.method, given, args.ray_workers, args.ray)
    with warnings_as_lines():
        det, path, split = train_model(args.data, args.method, given, data_params(args), args.out, args.progress,
                                       decision=decision, log=lambda m: print(m, file=sys.stderr, flush=True),
                                       shards=shards, tile_given="tile" in vars(args))  # typed or from --config
    held = f", {len(split['holdout'])} normal images held out" if split["holdout"] else ""
    print(f"trained {det.method} on {len(split['train'])} normal images of {split['root']} "
          f"({split['layout']} layout{held}) in {det.fit_seconds_:.1f} s")
    if getattr(det, "selection_", None):
        from insightad.apps.auto import format_table

        print(format_table(det.selection_["candidates"], det.selection_["chosen"]))
        print(f"auto chose {det.selection_['chosen']} (best AUROC on synthetic defects vs out-of-fold normals)")
    if getattr(det, "training_", None) is not None:
        _print_training(det.training_)
    from insightad.methods.ensemble import EnsembleDetector

    if isinstance(det, EnsembleDetector):
        print(det.weights_summary())
    print(f"default threshold {det.threshold_:.6g} ({det.threshold_strategy_})")
    _print_decision(det)
    if getattr(args, "report", None):
        from insightad.apps.train_report import write_train_report

        write_train_report(det, args.report)
        print(f"train report written to {args.report}/report.md")
    print(f"model written to {path}")
    # The out-of-fold validation (synthetic defects, their masks and maps: about 100 MB on bottle) served the
    # decision and the report; the export would otherwise hold it under its own peak. The export is the detector's
    # last use: its large tensors go before ONNX Runtime loads the graph to check it.
    det.validation_ = None
    if args.onnx:
        from insightad.apps.train import write_graph_beside

        print_graph_lines([write_graph_beside(det, path, release=True)[1]])
    sys.stdout.flush()
    return 0


def _print_decision(det) -> None:
    """The expected false-alarm rate and synthetic recall at the threshold, and warnings about them."""
    from insightad.decide.decisions import DecisionRecord

    rec = (getattr(det, "threshold_info_", None) or {}).get("decision")
    if not rec:
        return
    r = DecisionRecord.from_dict(rec)
    print(f"{r.summary()} (validation: {r.validation}, {r.n_normal} normals, {r.n_synthetic} synthetic defects)")
    if r.recall_by_kind:
        print("recall per synthetic defect kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.recall_by_kind.items()))
    sys.stdout.flush()
    for w in r.warnings:
        print(f"insightad: warning: {w}", file=sys.stderr)


def _print_training(result) -> None:
    """Epochs run, best epoch, where the checkpoint and curves are (shared training loop)."""
    best = f", best epoch {result.best_epoch}" if result.best_epoch else ""
    early = ", stopped early" if result.stopped_early else ""
    if getattr(result, "stop_reason", "") == "time_budget":
        early = f", stopped at the time budget ({result.time_budget:g} s)"
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    print(f"training: {result.epochs_run} epochs{best}{early}{resumed}")
    if result.checkpoint:
        print(f"checkpoint and curves in {result.checkpoint.parent}")


def run_backbone(args: argparse.Namespace) -> int:
    """``--method ssl``: train a backbone and write a backbone file (not a detector)."""
    import warnings

    from insightad.apps.train import params_class, train_backbone
    from insightad.backbones.ssl import RotationUnlearnableWarning

    params = gather(args, params_class(args.method))
    check_outputs(args, params)
    caught: list[Warning | str] = []  # the verdict on the rotation task reads best after the accuracy line
    shown = warnings.showwarning  # every other warning (memory, a long CPU run) is said when it is raised

    def defer_verdict(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, RotationUnlearnableWarning):
            caught.append(message)
        else:
            shown(message, category, *rest, **kw)

    with warnings.catch_warnings(), output_lock(args.out):
        warnings.simplefilter("always")
        warnings.showwarning = defer_verdict
        trainer, path, split = train_backbone(args.data, args.method, vars(params), data_params(args), args.out,
                                              args.progress)
    r = trainer.result_
    print(f"trained {args.method} backbone {trainer.spec_.arch} (init {params.init}) on {trainer.n_train_} "
          f"normal images of {split['root']} ({split['layout']} layout) in {r.seconds:.1f} s")
    _print_training(r)
    where = f"{trainer.n_val_} held-out images" if trainer.heldout_ else "the training images (no held-out split)"
    chance = trainer.metadata()["pretext_accuracy"]["chance"]
    print(f"{params.pretext} accuracy {trainer.accuracy_:.3f} on {where} (chance {chance:.2f})")
    print(f"backbone written to {path}; use it with --backbone ssl:{path}")
    sys.stdout.flush()
    for message in caught:
        print(f"insightad: warning: {message}", file=sys.stderr)
    return 0
