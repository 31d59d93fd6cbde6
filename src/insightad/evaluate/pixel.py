"""Pixel-level metrics of anomaly maps: pixel AUROC, AUPRO (up to FPR 0.3) and pixel AP.

Maps and masks are compared at a stated square resolution (256 px by default, as anomalib
reports): each map is resized there (bilinear with antialiasing), each mask with nearest
neighbour. Nothing holds every pixel of the test set: a first pass picks score bin edges from
a subsample of pixels (quantiles, so the bins adapt to any score scale), a second pass counts
pixels per bin; ROC, PRO and precision-recall curves are read off the cumulative counts. With
~10,000 bins the areas agree with exact computations to about 1e-4 (scores tied within one bin
count as interpolated, the usual trapezoid rule).

AUPRO: every connected defect region (8-connectivity) of every mask weighs the same; at each
threshold the per-region overlap is the fraction of the region above it, PRO is its mean over
regions, and FPR counts all defect-free pixels of all images. The PRO curve is integrated over
FPR in [0, 0.3] and divided by 0.3, so a perfect map scores 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from insightad.data.images import load_mask
from insightad.data.layouts import Sample
from insightad.data.resize import resize_array
from insightad.errors import InsightADError

RESOLUTION = 256
N_BINS = 10_000
FPR_LIMIT = 0.3
_SAMPLES_PER_BIN = 20  # pass 1 keeps about this many pixels per bin (a regular grid) to place the edges
_EIGHT = np.ones((3, 3), dtype=bool)
# numpy 2 renamed it (numpy 2 stubs lack trapz, which numpy < 2 still needs)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # type: ignore[attr-defined]


def resize_map(m: np.ndarray, resolution: int | None) -> np.ndarray:
    """A float map at the comparison resolution (bilinear, antialiased when shrinking: the one resize)."""
    m = np.asarray(m, dtype=np.float32)
    if resolution is None or m.shape == (resolution, resolution):
        return m
    return resize_array(m[None], (resolution, resolution))[0]


def resize_mask(mask: np.ndarray, resolution: int | None) -> np.ndarray:
    if resolution is None or mask.shape == (resolution, resolution):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.NEAREST)) > 0


def _gt(sample: Sample, shape: tuple[int, ...], resolution: int | None) -> np.ndarray | None:
    """The boolean ground truth at the comparison resolution; all False for a normal image without a
    mask; None for an anomalous image without one (it cannot be judged pixel by pixel)."""
    if sample.mask is not None:
        mask = load_mask(sample.mask, size=(shape[1], shape[0]), image_path=sample.path)
        return resize_mask(mask, resolution)
    if sample.label == 0:
        side = resolution or None
        return np.zeros((side, side) if side else shape, dtype=bool)
    return None


def _marks_nothing(sample: Sample, gt: np.ndarray) -> bool:
    """An anomalous image whose mask holds no defect pixel at the comparison resolution (all 0, or a mark read as
    0, or one too small to survive the resize): its defect cannot be judged, and its pixels counted as defect-free
    would blame the map for finding it."""
    return sample.label != 0 and not gt.any()


def _warn_empty(empty: list[Sample], resolution: int | None) -> None:
    """Say which anomalous images' masks mark nothing: left out of the pixel metrics, not counted defect-free."""
    if empty:
        at = f" at the {resolution} px comparison" if resolution else ""
        warnings.warn(f"{len(empty)} anomalous images have a mask with no defect pixel{at} (e.g. {empty[0].mask}): "
                      "the pixel metrics leave them out (a mask marks defects with non-zero values)", stacklevel=3)


NEARLY_ALL = 0.95  # a mask marking more of its image than this is said: an inverted mask (white background) reads so


def _warn_nearly_all(full: list[Sample], n_masks: int) -> None:
    """Say which masks mark nearly their whole image as defect: a mask drawn black on white reads as all defect
    (its background is non-zero), and the pixel metrics came out poor without a hint why."""
    if full:
        warnings.warn(f"{len(full)} of {n_masks} masks mark over {NEARLY_ALL:.0%} of their image as defect (e.g. "
                      f"{full[0].mask}): a mask marks defects non-zero on a zero (black) background; is it inverted?",
                      stacklevel=3)


def _edges(samples: Sequence[Sample], maps: Sequence[np.ndarray | None], resolution: int | None,
           n_bins: int) -> np.ndarray:
    picks = []
    lo, hi = np.inf, -np.inf
    total = sum(resolution * resolution if resolution else np.asarray(m).size for m in maps if m is not None)
    stride = max(1, int(np.sqrt(total / (n_bins * _SAMPLES_PER_BIN))))
    for s, m in zip(samples, maps):
        if m is None or (s.mask is None and s.label != 0):
            continue
        r = resize_map(m, resolution)
        lo, hi = min(lo, float(r.min())), max(hi, float(r.max()))
        picks.append(r[::stride, ::stride].ravel())
    if not picks:
        return np.empty(0)
    sample = np.concatenate(picks)
    edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, n_bins)))
    edges[0] = lo  # every pixel falls in a bin
    return edges


def pixel_metrics(samples: Sequence[Sample], maps: Sequence[np.ndarray | None], resolution: int | None = RESOLUTION,
                  n_bins: int = N_BINS, fpr_limit: float = FPR_LIMIT,
                  shapes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Pixel AUROC, AUPRO and pixel AP of ``maps`` against the masks of ``samples``.

    ``maps[i]`` is a float array at image i's own resolution (or None: not scored). Normal images
    without a mask count as defect-free; anomalous images without a mask, or whose mask marks no pixel at
    ``resolution``, are skipped (counted in ``pixel_images_skipped``; the second kind also in
    ``pixel_images_empty_mask``, and said in a warning). Metrics that are undefined for the data (no defect pixels, no
    defect-free pixels) are None. ``shapes[i]``: image i's (height, width) when its map was already
    brought to ``resolution`` (masks are still checked against the image's own size).
    """
    if len(samples) != len(maps):
        raise InsightADError(f"pixel metrics: {len(samples)} samples but {len(maps)} maps")
    from scipy import ndimage  # here, not at import: resize_map runs while scoring, before SciPy is needed

    edges = _edges(samples, maps, resolution, n_bins)
    nb = len(edges)
    neg = np.zeros(nb, dtype=np.int64)
    pos = np.zeros(nb, dtype=np.int64)
    pro_sum = np.zeros(nb, dtype=np.float64)
    n_regions = used = skipped = 0
    empty: list[Sample] = []
    full: list[Sample] = []
    for i, (s, m) in enumerate(zip(samples, maps)):
        if m is None:
            continue
        gt = _gt(s, tuple(shapes[i]) if shapes is not None else np.asarray(m).shape, resolution)
        if gt is None or _marks_nothing(s, gt):
            skipped += 1
            if gt is not None:
                empty.append(s)
            continue
        used += 1
        if s.mask is not None and gt.mean() > NEARLY_ALL:
            full.append(s)
        r = resize_map(m, resolution)
        if r.shape != gt.shape:
            raise InsightADError(f"{s.path}: map is {r.shape[1]}x{r.shape[0]} but its mask is {gt.shape[1]}x{gt.shape[0]}")
        b = np.searchsorted(edges, r, side="right") - 1
        neg += np.bincount(b[~gt], minlength=nb)
        pos += np.bincount(b[gt], minlength=nb)
        if gt.any():
            labels, k = ndimage.label(gt, structure=_EIGHT)
            per = np.bincount((labels[gt] - 1) * nb + b[gt], minlength=k * nb).reshape(k, nb)
            covered = np.cumsum(per[:, ::-1], axis=1)[:, ::-1]  # pixels of each region at or above bin j
            pro_sum += (covered / covered[:, :1]).sum(0)
            n_regions += k
    out: dict[str, Any] = {"pixel_auroc": None, "aupro": None, "pixel_ap": None, "pixel_resolution": resolution,
                           "pixel_images": used, "pixel_images_skipped": skipped, "pixel_images_empty_mask": len(empty),
                           "defect_regions": n_regions}
    _warn_empty(empty, resolution)
    _warn_nearly_all(full, sum(s.mask is not None for s in samples))
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:  # said, not left as a bare n/a or null
        out["pixel_undefined"] = ("the masks hold no defect pixels: all are 0" if n_pos == 0 and empty else
                                  "no image could be judged pixel by pixel (defective images without masks)"
                                  if not used else "the masks hold no defect pixels: all are 0" if n_pos == 0 else
                                  "no defect-free pixels (every mask is all defect and no normal image was scored)")
        return out
    # Predicted positive at threshold edges[j]: every pixel in bins >= j. Curves from the highest threshold down.
    tp = np.concatenate([[0], np.cumsum(pos[::-1])])
    fp = np.concatenate([[0], np.cumsum(neg[::-1])])
    tpr, fpr = tp / n_pos, fp / n_neg
    out["pixel_auroc"] = float(_trapezoid(tpr, fpr))
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    out["pixel_ap"] = float(np.sum(np.diff(tpr) * precision[1:]))
    pro = np.concatenate([[0.0], (pro_sum / n_regions)[::-1]])
    out["aupro"] = float(_area_to(fpr, pro, fpr_limit) / fpr_limit)
    return out


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], x ascending from 0, interpolating at ``limit``."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.sum() < len(x):
        j = int(keep.sum())
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        yl = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.append(xs, limit), np.append(ys, yl)
    return float(_trapezoid(ys, xs))
