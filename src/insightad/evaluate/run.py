"""Evaluate a detector on a dataset path: choose the honest images, score them, compute metrics."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insightad.config import DataParams
from insightad.data.images import check_mask_size, image_size
from insightad.data.layouts import Sample, discover, evaluation_samples
from insightad.errors import InsightADError
from insightad.evaluate.pixel import RESOLUTION, resize_map
from insightad.scoring import Prediction
from insightad.scoring import Scorer as Detector  # whatever scores: a PyTorch Detector or an ONNX export


def prefetch_metrics() -> None:
    """Import the metrics' libraries (scikit-learn and SciPy: 1-2 s of pure-Python import, more than the
    scoring of a small test set) on a background thread while the model loads and the images are
    scored; ONNX Runtime and the image decoders release the GIL, so the two overlap. The metrics'
    own import later waits for this one to finish and reports any failure itself."""
    threading.Thread(target=_import_metrics, name="insightad-import-metrics", daemon=True).start()


def _import_metrics() -> None:
    try:
        import scipy.ndimage  # noqa: F401
        import sklearn.metrics  # noqa: F401
    except Exception:  # noqa: BLE001, S110 - the main thread's import says what is wrong
        pass


@dataclass
class Evaluation:
    samples: list[Sample]
    prediction: Prediction
    metrics: dict[str, Any]


def predict_reduced(det: Detector, paths: list, maps: bool, threshold: float | None, progress: bool,
                    chunk: int = 32) -> tuple[Prediction, list[tuple[int, int]]]:
    """Predict through the one prediction loop, each map brought from the model's size straight to the pixel
    metrics' resolution (never through the image's own size), so memory does not grow with the number
    and size of test images. Returns the prediction and each image's own (height, width)."""
    parts: list[Prediction] = []
    for p in det.iter_predict(paths, chunk=chunk, maps=maps, threshold=threshold, progress=progress,
                              map_size="model"):
        if p.maps is not None:
            got = [m for m in p.maps if m is not None]
            if len(got) != len(p.maps):  # strict prediction: every image read has a map
                raise InsightADError("evaluate: an image came back without an anomaly map")
            p.maps = [resize_map(m, RESOLUTION).astype(np.float32) for m in got]
        parts.append(p)
    sizes = [image_size(path)[::-1] for path in paths] if maps else []
    return Prediction.concat(parts), sizes


def _warn_unmasked(samples: list[Sample]) -> None:
    """Anomalous images without a mask, where others have one, are left out of the pixel metrics: say so."""
    unmasked = [s for s in samples if s.label != 0 and s.mask is None]
    if unmasked:
        n = sum(s.label != 0 for s in samples)
        warnings.warn(f"{len(unmasked)} of {n} anomalous images have no mask (e.g. {unmasked[0].path}): the pixel "
                      "metrics leave them out", stacklevel=3)


ENLARGED = 4  # an image enlarged more than this to the model's size is said: its score says little


def _warn_small(det: Detector, samples: list[Sample]) -> None:
    """Images far smaller than the model's working size are enlarged to it without a word: a 1x1 image was scored
    (and judged pixel by pixel) on a 64x64 model like any other. Said in one line."""
    size = getattr(getattr(det, "preprocessing_", None), "size", None)
    if not size:
        return
    side = min(int(size[0]), int(size[1]))
    small = [(s.path, wh) for s in samples if (wh := _header_size(s.path)) and min(wh) * ENLARGED < side]
    if small:
        path, (w, h) = small[0]
        warnings.warn(f"{len(small)} of {len(samples)} images are over {ENLARGED} times smaller than the model's "
                      f"{size[1]}x{size[0]} working size (e.g. {path}, {w}x{h}): they are enlarged to be scored, so "
                      "their scores say little", stacklevel=3)


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header; None for a file that does not open (the scoring names it, with what was
    expected)."""
    try:
        return image_size(path)
    except InsightADError:
        return None


def _warn_unknown_split(det: Detector, root: Path, has_test_split: bool) -> None:
    """An ONNX export made before exports recorded the training split cannot tell training images from held-out
    ones: on a dataset without a test split every normal image is scored, training images included."""
    meta = getattr(det, "onnx_meta_", None)
    if meta is None or "split" in meta or getattr(det, "split_", None) is not None or has_test_split:
        return
    warnings.warn(f"{getattr(det, 'model_path_', 'the ONNX export')}: this export records no training split (made "
                  f"before exports did): every normal image of {root} is scored, training images included, so the "
                  "figures are optimistic; evaluate the model file, or export it again", stacklevel=3)


def evaluate_model(det: Detector, data: str | Path, dp: DataParams, threshold: float | None = None,
                   progress: bool = True) -> Evaluation:
    """Score the held-out/test images of ``data`` (never training images) and compute metrics.

    Maps in the returned prediction are at the pixel metrics' resolution (256 px), not the inputs'.
    """
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    _warn_unknown_split(det, ds.root, ds.has_test_split)
    samples = evaluation_samples(ds, getattr(det, "split_", None))
    for s in samples:  # before scoring, for every method: a wrong mask is a wrong dataset
        if s.mask is not None:
            check_mask_size(s.mask, s.path)
    _warn_small(det, samples)
    want_maps = det.has_maps and any(s.mask is not None for s in samples)
    if want_maps:
        _warn_unmasked(samples)
    pred, sizes = predict_reduced(det, [s.path for s in samples], want_maps, threshold, progress)
    from insightad.evaluate.metrics import image_metrics
    from insightad.evaluate.pixel import pixel_metrics

    labels = np.array([s.label for s in samples])
    if pred.threshold is None:
        raise InsightADError(f"{det.method}: the detector has no threshold to evaluate against")
    m: dict[str, Any] = image_metrics(labels, pred.scores, pred.threshold)
    m["method"] = det.method
    m["threshold_strategy"] = det.threshold_strategy_ if threshold is None else "override"
    if want_maps:
        m.update(pixel_metrics(samples, pred.maps or [], shapes=sizes))
    return Evaluation(samples, pred, m)
