"""Train: discover the data, split off held-out normals, fit a detector, write its model file."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from insightad.backbones.registry import SSL_FINE_TUNE, SSL_PREFIX, read_backbone_file_meta
from insightad.config import DEFAULT_BACKBONE, DataParams, DecisionParams, TrainLoopParams
from insightad.data.layouts import Dataset, check_training_content, content_record, discover, holdout_split
from insightad.errors import InsightADError
from insightad.methods import Detector, create_detector, get_method
from insightad.methods.base import ShardRunner
from insightad.model_file import save_model
from insightad.training.checkpoint import FILE_NAME as CHECKPOINT_FILE


def default_model_path(data: Path, method: str) -> Path:
    return Path("models") / f"{Path(data).resolve().name}-{method}.safetensors"


def training_dir(out: Path) -> Path:
    """Where a trainable method keeps its checkpoint, history and curves: beside the output file."""
    return out.with_suffix(".training")


BACKBONE_METHODS = ("ssl",)  # train a backbone file for --backbone ssl:PATH, not a detector
FINE_TUNE_FROM = DEFAULT_BACKBONE


def params_class(method: str) -> type:
    """The hyper-parameter dataclass of a detector method or of the backbone trainer."""
    if method in BACKBONE_METHODS:
        from insightad.backbones.ssl import SSLParams

        return SSLParams
    return get_method(method).Params


def with_training_dir(method: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Methods trained by the shared loop checkpoint next to their output unless told otherwise."""
    if issubclass(params_class(method), TrainLoopParams) and not params.get("checkpoint_dir"):
        return {**params, "checkpoint_dir": str(training_dir(out))}
    return params


def split_record(ds: Dataset, train: list, held: list, dp: DataParams,
                 hashes: list[str] | None = None) -> dict[str, Any]:
    """What the model file keeps about its training data: exactly which files, and which were held out.
    ``hashes``: the training files' sha256 where the caller has them (``check_training_content``)."""
    return {"root": str(ds.root), "layout": ds.layout, "holdout_fraction": 0.0 if ds.has_test_split else dp.holdout,
            "seed": dp.seed, "train": [ds.rel(s.path) for s in train],
            "train_sha256": hashes if hashes is not None else content_record([s.path for s in train]),
            "holdout": [ds.rel(s.path) for s in held]}


def backbone_training(det: Detector) -> dict[str, Any] | None:
    """The images an ``ssl:`` backbone of ``det`` was fine-tuned on, from its file's split record: {"file",
    "root", "train"} (None for an ImageNet backbone, or a backbone file that names no training images)."""
    source = getattr(det, "backbone_source_", None) or ""
    if not source.startswith(SSL_PREFIX):
        return None
    path = source[len(SSL_PREFIX):]
    split = read_backbone_file_meta(Path(path)).get("split") or {}
    if not split.get("root") or not split.get("train"):
        return None
    return {"file": path, "root": str(split["root"]), "train": list(split["train"]),
            "train_sha256": list(split.get("train_sha256") or [])}


def _warn_backbone_saw_held_out(backbone: dict[str, Any], ds: Dataset, held: list) -> None:
    """A backbone fine-tuned on images this model holds out would make their evaluation optimistic: say so
    now (``evaluate`` refuses those images)."""
    seen = {(Path(backbone["root"]) / r).resolve() for r in backbone["train"]}
    overlap = [s.path for s in held if s.path.resolve() in seen]
    if overlap:
        warnings.warn(f"the backbone {backbone['file']} was fine-tuned on {len(overlap)} of the {len(held)} images "
                      f"held out from {ds.root} (e.g. {overlap[0].name}); evaluate will leave them out. Fine-tune it "
                      "with the same --holdout and --seed as this model", stacklevel=2)


LARGE_RATIO = 3.0  # images at least this many times the working size (shorter sides) get the tiling note
SIZE_SAMPLE = 16  # image headers read for it


def large_images_note(paths: list[Path], params: dict[str, Any], method: str = "patchcore") -> str | None:
    """A line for ``train`` when the training images are much larger than the size they are scored at and the
    method could tile but does not: a defect a few pixels across in the original is below one model pixel.
    None otherwise (and for images whose headers cannot be read: the fit has read them already)."""
    from insightad.data.images import image_size

    size = params.get("image_size")
    if params.get("tile") != 1 or not isinstance(size, int) or not paths:
        return None
    step = max(1, len(paths) // SIZE_SAMPLE)
    try:
        sides = sorted(image_size(p) for p in paths[::step][:SIZE_SAMPLE])
    except InsightADError:
        return None
    w, h = sides[len(sides) // 2]
    ratio = min(w, h) / size
    if ratio < LARGE_RATIO:
        return None
    return (f"note: the training images are about {w} x {h} px and are scored at {size} px, {ratio:.1f} times smaller: "
            f"a defect under about {ratio:.0f} px across in the original covers less than one pixel of the model. "
            f"For small defects, try {'' if method == 'patchcore' else '--method patchcore '}--tile 2 (on MVTec bottle, "
            "900 px: AUPRO 0.933 -> 0.963, pixel AUROC 0.983 -> 0.987; predict 5x slower, fit 18x longer; "
            "docs/defaults.md, 'Tiled work')")


def _say_large_images(paths: list[Path], det: Detector, log: Callable[[str], None] | None) -> None:
    """``large_images_note`` for ``det``, through ``log``; no image header is read without one."""
    if log is None:
        return
    note = large_images_note(paths, det.get_params(), det.method)
    if note:
        log(note)


def _check_validation_size(params: dict[str, Any]) -> None:
    """The default threshold is chosen on synthetic defects drawn on images at the model's size: below their
    smallest side, refused before the fit (the validation refused it after)."""
    from insightad.data.synthetic import MIN_SIZE

    size = params.get("image_size")
    if isinstance(size, int) and size < MIN_SIZE and (params.get("tile") or 1) == 1:
        raise InsightADError(f"--image-size: {size} px is too small to choose the threshold on (the synthetic defects "
                             f"it is validated on need images of at least {MIN_SIZE} px); use --image-size {MIN_SIZE} or more")


def train_model(data: str | Path, method: str, params: dict[str, Any], dp: DataParams,
                out: str | Path | None = None, progress: bool = True, decision: DecisionParams | None = None,
                log: Callable[[str], None] | None = None, shards: ShardRunner | None = None,
                tile_given: bool = False) -> tuple[Detector, Path, dict]:
    """Fit ``method`` (or ``auto``) on the normal training images of ``data``; returns (detector, model
    path, split). With ``decision``, the threshold is chosen on out-of-fold normals and synthetic defects
    (``methods.crossfit``); without it, the method's own default stays. ``shards`` spreads a reduction fit
    over workers (see ``apps.train_ray``). ``tile_given``: the user chose ``tile`` (no note suggesting it)."""
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    train, held = holdout_split(ds, dp.holdout, dp.seed)
    hashes = check_training_content(ds, train, held)  # before any fit: identical images are refused
    if decision is not None:
        _check_validation_size(params)
    if decision is not None and len(train) < 2:  # said before the fit, not after it by the validation
        held_out = f" ({len(held)} of the {len(train) + len(held)} normal images held out)" if held else ""
        raise InsightADError(f"{ds.root}: {len(train)} training image{held_out}; choosing the threshold scores the "
                             "training images out of fold and needs at least 2 (add normal images"
                             + (", or lower --holdout)" if held else ")"))
    out = Path(out or default_model_path(ds.root, method))
    paths = [s.path for s in train]
    note = None if tile_given else log
    if params.get("backbone") == SSL_FINE_TUNE:
        params = _fine_tune_first(ds, train, held, dp, params, out, progress, log)
    if method == "auto":
        from insightad.apps.auto import auto_fit

        det, _ = auto_fit(paths, params, decision or DecisionParams(), seed=dp.seed, progress=progress,
                          log=log)
        _say_large_images(paths, det, note)
    else:
        det = create_detector(method, **with_training_dir(method, params, out))
        _say_large_images(paths, det, note)  # before the fit: whoever wants to tile can stop and start again
        det.fit(paths, progress=progress, shards=shards)
        if decision is not None:
            _validate(det, paths, decision, dp.seed)
    if log is not None and decision is not None:
        _say_refit_folds_unused(det, decision, log)
    det.split_ = split_record(ds, train, held, dp, hashes)
    backbone = backbone_training(det)
    if backbone is not None:
        det.split_["backbone"] = backbone
        _warn_backbone_saw_held_out(backbone, ds, held)
    path = save_model(det, out)
    return det, path, det.split_


def _say_refit_folds_unused(det: Detector, decision: DecisionParams, log: Callable[[str], None]) -> None:
    """``--refit-folds all`` asked for, and the model was validated without refitting (baseline, PaDiM and PatchCore
    score every training normal out of fold exactly; ``crossfit.scheme_for`` decides): one note line, so nobody
    waits for a difference."""
    from insightad.methods.crossfit import scheme_for

    if decision.refit_folds != "all" or scheme_for(det, "all") == "kfold-refit":
        return
    validation = ((getattr(det, "threshold_info_", None) or {}).get("decision") or {}).get("validation")
    log(f"note: --refit-folds all changed nothing for {det.method}: it is validated on every training normal "
        f"without refitting ({validation or scheme_for(det, 'all')})")


def _validate(det: Detector, paths: list[Path], decision: DecisionParams, seed: int) -> None:
    """Choose the threshold out of fold. Ctrl-C here comes after the training itself: say that its checkpoint is
    complete, so --resume goes straight back to the validation instead of training again."""
    import sys

    from insightad.methods.crossfit import validate_and_decide

    try:
        validate_and_decide(det, paths, decision.threshold_strategy, decision.max_false_alarms, decision.folds, seed,
                            decision.refit_folds)
    except KeyboardInterrupt:
        checkpoint = getattr(getattr(det, "training_", None), "checkpoint", None)
        if checkpoint is not None:
            print(f"{det.method}: interrupted while choosing the threshold (out-of-fold validation), after the "
                  f"training: its checkpoint {checkpoint} is complete; run again with --resume to skip the training",
                  file=sys.stderr)
        raise


def write_graph_beside(det: Detector, model_path: str | Path, release: bool = False) -> tuple[Path | None, str]:
    """The verified ONNX graph next to the model file (``model.safetensors`` -> ``model.onnx``), written
    atomically and stamped with the model file's sha256, so predict/serve on the onnx engine start from it
    (and a runtime-only install can score with it alone). (path, a line to print); path None when skipped.
    ``release``: ``det`` is spent by the export (``export_onnx``), for a caller done with it."""
    from insightad.engines.cache import model_digest
    from insightad.inference.export import beside, check_graph_output, export_onnx

    out = beside(model_path)
    if out == Path(model_path):
        return None, f"no ONNX graph written: the model file {model_path} already ends in .onnx"
    if det.onnx_unsupported:
        return None, f"no ONNX graph written: {det.method} cannot be exported ({det.onnx_unsupported})"
    try:
        check_graph_output(out, model_path, "the graph beside the model,")
        export_onnx(det, out, model_digest(model_path), release=release)
    except InsightADError as e:
        return None, f"warning: no ONNX graph written ({e}); the onnx engine will export it on first use"
    model_digest(model_path)  # remembered now, if the file was too fresh to trust its timestamp before
    return out, f"ONNX graph written to {out} (verified against PyTorch)"


def train_backbone(data: str | Path, method: str, params: dict[str, Any], dp: DataParams,
                   out: str | Path | None = None, progress: bool = True) -> tuple[Any, Path, dict]:
    """Train a backbone (``ssl``) on the same normal training images a detector would use, so
    the held-out and anomalous images stay unseen; returns (trainer, backbone file, split)."""
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    train, held = holdout_split(ds, dp.holdout, dp.seed)
    check_training_content(ds, train, held)
    out = Path(out or default_model_path(ds.root, method))
    return _fit_backbone(ds, train, held, dp, params, out, progress)


def _fit_backbone(ds: Dataset, train: list, held: list, dp: DataParams, params: dict[str, Any], out: Path,
                  progress: bool) -> tuple[Any, Path, dict]:
    from insightad.backbones.ssl import SSLTrainer

    trainer = SSLTrainer(**with_training_dir("ssl", params, out))
    trainer.fit([s.path for s in train], progress=progress)
    split = split_record(ds, train, held, dp)
    return trainer, trainer.save(out, split), split


def fine_tuned_backbone_path(model_out: Path) -> Path:
    """Where ``--backbone ssl`` writes the backbone it fine-tunes: beside the model file."""
    return model_out.with_name(f"{model_out.stem}.backbone.safetensors")


def _fine_tune_first(ds: Dataset, train: list, held: list, dp: DataParams, params: dict[str, Any], out: Path,
                     progress: bool, log: Callable[[str], None] | None) -> dict[str, Any]:
    """``--backbone ssl``: fine-tune ``FINE_TUNE_FROM`` with the ssl defaults (CutPaste) on exactly the
    detector's training images, write it beside the model file, and return the detector's params pointing to it.
    The detector's image size, device, decoding workers, seed and starting weights carry over, and its --resume
    continues the fine-tune from its checkpoint where one was left; its own training settings (a trained method's
    epochs, learning rate...) do not."""
    shared = {k: params[k] for k in ("image_size", "device", "workers") if params.get(k) is not None}
    weights = params.get("weights")
    if weights == "random":
        shared["init"] = "random"
    elif weights:
        shared["weights"] = weights
    shared.update(backbone=FINE_TUNE_FROM, seed=dp.seed)
    path = fine_tuned_backbone_path(out)
    if params.get("resume") and (training_dir(path) / CHECKPOINT_FILE).is_file():
        shared["resume"] = True  # the detector's --resume: the fine-tune's own checkpoint, not 8 minutes again
    if log and shared.get("resume"):
        log(f"continuing the CutPaste fine-tune of the backbone from its checkpoint in {training_dir(path)} -> {path}")
    elif log:
        log(f"fine-tuning a CutPaste backbone ({FINE_TUNE_FROM}) on the {len(train)} training images first "
            f"(docs/ssl.md; 200 images at 256 px take about 8 minutes on a 2-core CPU) -> {path}")
    trainer, path, _ = _fit_backbone(ds, train, held, dp, shared, path, progress)
    if log:
        acc = trainer.metadata()["pretext_accuracy"]
        log(f"backbone written to {path} ({trainer.params.pretext} accuracy {acc['value']:.3f} on {acc['n_images']} "
            f"held-out images, chance {acc['chance']:.2f})")
    # The starting weights are in the fine-tuned file now; left set they would replace it in the detector.
    return {**params, "backbone": f"{SSL_PREFIX}{path}", "weights": None}
