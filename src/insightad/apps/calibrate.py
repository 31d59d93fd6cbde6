"""Calibrate: score images the model was not trained on, choose a threshold, keep it in the model file.

Images come from ``--data`` through the same rules as evaluation (``evaluation_samples``): on the
training dataset, the held-out normals (or the MVTec test split) and the defective images; on any
other folder (e.g. a flat folder of extra normal images), every image. Training images are refused.
For methods with maps, the same strategy applied to each image's map maximum gives the pixel level
at which overlays draw the defect outline (``pixel_threshold``).
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insightad.config import DataParams
from insightad.data.layouts import ANOMALOUS, NORMAL, Dataset, Sample, discover, evaluation_samples, refuse_training_images
from insightad.decide.normalize import robust_scale
from insightad.decide.thresholds import STRATEGIES, ThresholdChoice, choose_threshold
from insightad.errors import InsightADError
from insightad.methods import Detector


@dataclass
class Calibration:
    """The choice, the images it was made on and their scores."""

    choice: ThresholdChoice
    dataset: Dataset
    samples: list[Sample]
    scores: np.ndarray

    def folders(self) -> dict[str, int]:
        """Images used, counted per folder (relative to the dataset root), for a one-line summary."""
        return dict(Counter(str(Path(self.dataset.rel(s.path)).parent) for s in self.samples))

    def threshold_record(self) -> dict[str, Any]:
        """The model file's ``threshold`` entry."""
        return {"value": self.choice.value, "strategy": self.choice.strategy, "details": self.choice.details}


def score_with_map_max(det: Detector, paths: list[Path], want_map_max: bool, progress: bool = False
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw scores (and each map's maximum) through the one prediction loop, maps held a chunk at a time."""
    scores, map_max = [], []
    for pred in det.iter_predict(paths, chunk=32, maps=want_map_max, progress=progress):
        scores.append(pred.scores)
        if want_map_max and pred.maps is not None:
            map_max.append(np.array([float(np.max(m)) if m is not None else float("nan") for m in pred.maps]))
    return np.concatenate(scores), (np.concatenate(map_max) if want_map_max else None)


def calibration_samples(det: Detector, data: str | Path, dp: DataParams, strategy: str
                        ) -> tuple[Dataset, list[Sample], list[str]]:
    """The images a strategy may use (never training images), and warnings about them."""
    if strategy not in STRATEGIES:
        raise InsightADError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    split = getattr(det, "split_", None)
    samples = evaluation_samples(ds, split)
    warnings = []
    if strategy == "percentile":
        samples = [s for s in samples if s.label == NORMAL]
        if not samples:
            raise InsightADError(f"{ds.root}: no normal images the model was not trained on (train with --holdout > 0, "
                                 "or point --data at a folder of extra normal images)")
    elif not any(s.label == ANOMALOUS for s in samples):
        raise InsightADError(f"{ds.root}: strategy {strategy} needs defective images and found none "
                             "(use --strategy percentile with normal images only)")
    if split and Path(split.get("root", "")) == ds.root:
        warnings.append(f"these are the images 'insightad evaluate' scores on {ds.root}: its figures that depend on "
                        "the threshold (accuracy, precision, recall, F1) will be optimistic; calibrate on separate "
                        "images (e.g. a folder of extra normal images) to avoid this")
    return ds, samples, warnings


def calibrate(det: Detector, data: str | Path, dp: DataParams, strategy: str = "percentile",
              percentile: float = 95.0, progress: bool = False) -> Calibration:
    """Choose a threshold for ``det`` on images of ``data`` (the detector is not changed)."""
    ds, samples, warnings = calibration_samples(det, data, dp, strategy)
    labels = np.array([s.label == ANOMALOUS for s in samples])
    scores, map_max = score_with_map_max(det, [s.path for s in samples], det.has_maps, progress=progress)
    choice = choose_threshold(strategy, scores, labels, percentile)
    details: dict[str, Any] = dict(choice.details)
    details.update({
        "data": str(ds.root), "layout": ds.layout, "n_normal": int((~labels).sum()), "n_anomalous": int(labels.sum()),
        "scale": robust_scale(scores[~labels], choice.value) if (~labels).any() else None,
        "previous": {"value": getattr(det, "threshold_", None), "strategy": getattr(det, "threshold_strategy_", None)},
        "calibrated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "images": [ds.rel(s.path) for s in samples],
    })
    if map_max is not None:
        pixel = choose_threshold(strategy, map_max, labels, percentile)
        details["pixel_threshold"] = pixel.value
        details["pixel_scale"] = robust_scale(map_max[~labels], pixel.value) if (~labels).any() else None
    choice.warnings = warnings + choice.warnings
    details["warnings"] = list(choice.warnings)
    choice.details = details
    return Calibration(choice, ds, samples, scores)


def labels_samples(det: Detector, lf: Any) -> list[Path]:
    """The images of a ``path,label`` labels file (``decide.labels.LabelFile``), all present and none a
    training image of ``det`` (the same refusal as ``--data``)."""
    paths = lf.paths()
    folders = [p for p in paths if p.is_dir()]
    if folders:
        what = "path is a folder" if len(folders) == 1 else "paths are folders"
        raise InsightADError(f"{lf.source}: {len(folders)} listed {what}, e.g. {folders[0]}; expected one image "
                             "file per row")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InsightADError(f"{lf.source}: {len(missing)} listed {'image' if len(missing) == 1 else 'images'} not "
                             f"found, e.g. {missing[0]}")
    refuse_training_images(paths, getattr(det, "split_", None))
    return paths


def labels_record(det: Detector, lf: Any, scores: np.ndarray, strategy: str, percentile: float = 95.0
                  ) -> dict[str, Any]:
    """The model file's ``threshold`` entry from operator labels (``decide.labels.LabelFile``). It
    replaces the whole entry, so training-time estimates (``details.decision``) are dropped."""
    from insightad.decide.decisions import wilson_interval

    labels = np.asarray(lf.labels, bool)
    choice = choose_threshold(strategy, scores, labels, percentile)
    normal, anomalous = scores[~labels], scores[labels]
    fa = int((normal > choice.value).sum())
    details: dict[str, Any] = dict(choice.details)
    details.update({
        "labels": str(lf.source), "labels_form": lf.form, "n_normal": int((~labels).sum()),
        "n_anomalous": int(labels.sum()),
        "false_alarm_rate": float(fa / normal.size) if normal.size else None,
        "false_alarm_interval": list(wilson_interval(fa, normal.size)) if normal.size else None,
        "recall": float((anomalous > choice.value).mean()) if anomalous.size else None,
        "scale": robust_scale(normal, choice.value) if normal.size else None,
        "previous": {"value": getattr(det, "threshold_", None), "strategy": getattr(det, "threshold_strategy_", None)},
        "calibrated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "warnings": list(choice.warnings),
    })
    return {"value": choice.value, "strategy": f"labels_{strategy}", "details": details}


def apply_record(det: Detector, model_path: str | Path, record: dict[str, Any],
                 ready: Callable[[Path], Any] | None = None) -> None:
    """Store a ``threshold`` entry in the model file (rewritten atomically) and in ``det``; ``ready``: called
    on the new file before it replaces the old one (calibrate --out records its sha256 there)."""
    from insightad.model_file import update_metadata

    update_metadata(model_path, ready=ready, threshold=record)
    det.set_threshold(record["value"], record["strategy"], **record["details"])


def graphs_beside(model_path: str | Path) -> tuple[list[Path], list[Path]]:
    """(the model file's paths, as given and through a link, whose graph beside is this model's: stamped with
    its sha256 now, before calibrate changes it; the other files at those graph names, to be left alone).
    Called before the model file is rewritten: afterwards nothing tells this model's graph from another's."""
    from insightad.engines.cache import model_digest
    from insightad.engines.onnx_runtime import verified_entry
    from insightad.inference.export import beside

    mine: list[Path] = []
    others: list[Path] = []
    digest = model_digest(model_path)
    for path in dict.fromkeys((Path(model_path), Path(model_path).resolve())):
        graph = beside(path)
        if graph == path or not graph.is_file() or graph.resolve() in {beside(g).resolve() for g in mine} | {
                g.resolve() for g in others}:
            continue
        engine = verified_entry(graph, digest, 1, delete=False, arena=False)
        if engine is not None:
            mine.append(path)
        else:
            others.append(graph)
        del engine
    return mine, others


def refresh_graphs(model_path: str | Path, mine: list[Path], others: list[Path]) -> list[str]:
    """The model's own graphs (beside the paths ``graphs_beside`` found before the rewrite) exported again from
    the rewritten file; a line per graph saying what was done. Files that were not its graph are not touched."""
    from insightad.apps.train import write_graph_beside
    from insightad.inference.export import beside
    from insightad.model_file import load_model

    det: Detector | None = None
    lines = [f"{graph} left as it is: not this model's ONNX graph (made from another model file, or not a graph)"
             for graph in others]
    for path in mine:
        graph = beside(path)
        det = det or load_model(model_path)
        written, line = write_graph_beside(det, path)
        lines.append(f"ONNX graph {graph} refreshed for the new threshold (verified against PyTorch)" if written
                     else f"warning: {graph} no longer matches the model file and is not used; refreshing it "
                          f"failed ({line.removeprefix('warning: ')})")
    return lines
