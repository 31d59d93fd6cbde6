"""The scoring protocol and the one prediction loop, on numpy arrays (no PyTorch).

A ``Scorer`` has a preprocessing, a threshold and a way to run a batch (``_run``: an engine such as
ONNX Runtime here, the PyTorch model in ``methods.base.Detector``). Everything from image sources to
Predictions with decisions is written once, here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from insightad.data.images import DEFAULT_MAX_PIXELS
from insightad.data.loader import Batch, ImageSource, iter_batches
from insightad.data.preprocess import Preprocessing
from insightad.data.resize import resize_array
from insightad.decide.normalize import normalize_scores
from insightad.errors import InsightADError
from insightad.scoring.prediction import Prediction, non_finite_message


def upsample_maps(maps: np.ndarray | Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Maps at model size (B, h, w) -> one float32 array per image at its own (H, W) (the one resize)."""
    out = []
    for m, (h, w) in zip(maps, sizes):
        m = np.asarray(m, dtype=np.float32)
        out.append(m if m.shape == (h, w) else resize_array(m[None], (h, w))[0])
    return out


def equal_size_runs(images: Sequence[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """(start, stacked run) for each run of consecutive images of one shape: one forward pass each."""
    start = 0
    for i in range(1, len(images) + 1):
        if i == len(images) or images[i].shape != images[start].shape:
            yield start, np.stack(images[start:i])
            start = i


class Scorer:
    """Scores images: preprocessing, threshold, decisions and the prediction loop; ``_run`` does the maths.

    ``engine_`` (when set) is a callable taking a numpy batch and returning (scores, maps) arrays; with
    ``decoded_input`` it takes uint8 images at their own size (an exported graph resizes inside), else
    float32 (0..255) at the model's size.
    """

    method: ClassVar[str] = ""
    has_maps: ClassVar[bool] = False  # predict returns per-pixel maps

    batch_size: int
    workers: int
    preprocessing_: Preprocessing
    threshold_: float
    threshold_strategy_: str
    threshold_info_: dict[str, Any]
    engine_: Any
    engine_name_: str
    model_path_: str
    warmed_up_: bool  # the engine has scored once (inference.load.warm_up)
    images_per_run_: int | None  # at most this many images per engine call (a tiled graph: config.images_per_run)

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "engine_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise InsightADError(f"{self.method}: the detector is not fitted yet (call fit or load a model file)")

    def set_threshold(self, value: float, strategy: str, **details: Any) -> Scorer:
        """Record the decision threshold and how it was chosen (kept in the model file)."""
        if not np.isfinite(value):
            raise InsightADError(f"threshold: expected a finite number, got {value!r}")
        self.threshold_ = float(value)
        self.threshold_strategy_ = strategy
        self.threshold_info_ = {k: v for k, v in details.items()}
        return self

    # ------------------------------------------------------------------ one batch
    @property
    def decoded_input(self) -> bool:
        """True when the engine takes decoded uint8 images at their own size (an exported graph)."""
        return bool(getattr(getattr(self, "engine_", None), "takes_original", False))

    def load_input(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS
                   ) -> tuple[np.ndarray, tuple[int, int]]:
        """One image as this scorer's engine takes it (C, H, W), and its original (height, width); a file or
        bytes over ``max_pixels`` is refused."""
        p = self.preprocessing_
        if self.decoded_input:
            x = p.decode(source, max_pixels)
            return x, (int(x.shape[1]), int(x.shape[2]))
        return p.load(source, max_pixels)

    def _run(self, x: np.ndarray) -> Sequence[Any]:
        engine = getattr(self, "engine_", None)
        if engine is None:
            raise InsightADError(f"{self.method}: no engine to score with (load a model file or an ONNX export)")
        return engine(x)

    def forward_batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch (B, C, H, W) as ``load_input`` makes them -> (scores (B,), maps (B, h, w) at model size
        or None), float32."""
        self._check_fitted()
        out = self._run(x)
        scores = np.asarray(out[0], dtype=np.float32).reshape(-1)
        maps = np.asarray(out[1], dtype=np.float32) if len(out) > 1 and out[1] is not None else None
        return scores, maps

    def forward_images(self, images: Sequence[np.ndarray], max_batch: int | None = None
                       ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Images of any sizes -> (scores, maps at model size or None), runs of one size batched together."""
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] | None = []
        caps = [c for c in (max_batch, getattr(self, "images_per_run_", None)) if c]
        step = min(caps) if caps else (len(images) or 1)
        for lo in range(0, len(images), step):
            for _, x in equal_size_runs(images[lo:lo + step]):
                s, m = self.forward_batch(x)
                scores.append(s)
                if m is None:
                    maps = None
                elif maps is not None:
                    maps.extend(m)
        return (np.concatenate(scores) if scores else np.empty(0, np.float32)), maps

    # ------------------------------------------------------------------ the prediction loop
    def _input_batches(self, images: Sequence[ImageSource], progress: bool, desc: str, strict: bool = True,
                       batch_size: int | None = None) -> Iterable[Batch]:
        """Batches of ``batch_size`` images (default: the detector's) read ahead by the loader's threads."""
        size = batch_size or self.batch_size
        batches = iter_batches(images, self.load_input, size, self.workers, strict=strict)
        n = (len(images) + size - 1) // size
        return tqdm(batches, total=n, desc=desc, unit="batch", disable=not progress, leave=False)

    def iter_predict(self, images: Sequence[ImageSource] | ImageSource, *, chunk: int = 64, maps: bool = True,
                     strict: bool = True, progress: bool = False, threshold: float | None = None,
                     map_size: str = "image") -> Iterator[Prediction]:
        """The one prediction loop: Predictions of consecutive chunks of ``images`` (``offset`` says
        where each starts), so memory is bounded by the chunk, not the input. Maps come back at each
        input's own resolution (``map_size="model"``: as the model makes them, for a caller that brings
        them to a resolution of its own, e.g. evaluate's 256 px). ``strict=False`` marks unreadable
        images in ``errors`` (score NaN)."""
        if map_size not in ("image", "model"):
            raise InsightADError(f"map_size: expected 'image' or 'model', got {map_size!r}")
        self._check_fitted()
        if not isinstance(images, (list, tuple)):
            images = [images]
        n, chunk = len(images), max(1, int(chunk))
        thr = self.threshold_ if threshold is None else threshold  # (a FileThreshold keeps its scale)
        want_maps = maps and self.has_maps
        start = 0
        scores: dict[int, float] = {}
        got_maps: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for batch in self._input_batches(images, progress, "predict", strict=strict):
            errors.update(batch.errors)
            if batch.indices:
                s, m = self.forward_images(batch.images)
                values = s.astype(np.float64).tolist()
                scores.update(zip(batch.indices, values))
                if want_maps and m is not None:
                    got_maps.update(zip(batch.indices, upsample_maps(m, batch.sizes) if map_size == "image"
                                        else list(m)))
                for i, v in zip(batch.indices, values):
                    if not np.isfinite(v):  # scored, but not a number: an error for that image, never "normal"
                        errors[i] = non_finite_message(images[i], v)
                        scores[i] = float("nan")
                        if strict:
                            raise InsightADError(errors[i])
            seen = max([*batch.indices, *batch.errors], default=start - 1) + 1
            while start + chunk <= seen:
                yield self._chunk(start, start + chunk, scores, got_maps, errors, thr, want_maps)
                start += chunk
        if start < n:
            yield self._chunk(start, n, scores, got_maps, errors, thr, want_maps)

    def _chunk(self, lo: int, hi: int, scores: dict[int, float], maps: dict[int, np.ndarray],
               errors: dict[int, str], thr: float, want_maps: bool) -> Prediction:
        """Images lo..hi-1 as one Prediction with decisions (popped from the running dicts)."""
        s = np.array([scores.pop(i, np.nan) for i in range(lo, hi)], dtype=np.float64)
        m = [maps.pop(i, None) for i in range(lo, hi)] if want_maps else None
        err = {i - lo: errors.pop(i) for i in range(lo, hi) if i in errors}
        return self.decide(s, m, thr, err, offset=lo)

    def decide(self, scores: np.ndarray, maps: list[np.ndarray | None] | None = None, threshold: float | None = None,
               errors: dict[int, str] | None = None, offset: int = 0) -> Prediction:
        """Raw scores -> a Prediction with decisions and normalised scores: the one place a decision is
        made, whoever scored the images (the prediction loop, the server's micro-batches)."""
        thr = self.threshold_ if threshold is None else float(threshold)
        # A threshold from a threshold file carries the scale calibrated with it (apps.threshold_file.FileThreshold)
        scale = getattr(threshold, "scale", None) or getattr(self, "threshold_info_", {}).get("scale")
        s = np.asarray(scores, dtype=np.float64)
        labels = np.where(np.isfinite(s), s > thr, False)
        normalized = normalize_scores(s, thr, scale)
        return Prediction(s, maps, thr, labels, normalized, errors=dict(errors or {}), offset=offset)

    def predict(self, images: Sequence[ImageSource] | ImageSource, *, maps: bool = True, strict: bool = True,
                progress: bool = False, threshold: float | None = None) -> Prediction:
        """Score images (all at once: ``iter_predict`` bounds memory on large inputs)."""
        n = len(images) if isinstance(images, (list, tuple)) else 1
        return Prediction.concat(list(self.iter_predict(images, chunk=max(1, n), maps=maps, strict=strict,
                                                         progress=progress, threshold=threshold)))

    def anomaly_score(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Raw scores only (higher = more anomalous)."""
        return self.predict(images, maps=False).scores
