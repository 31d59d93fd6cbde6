"""Pixel AUROC / AUPRO / pixel AP against exact references on small data, and their input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from insightad.data.layouts import Sample
from insightad.errors import InsightADError
from insightad.evaluate.pixel import pixel_metrics


def _write_mask(path: Path, mask: np.ndarray) -> Path:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def _dataset(tmp_path: Path, n_bad: int = 4, n_good: int = 3, size: int = 32, seed: int = 0):
    """Anomalous images with 1-2 square regions each, normal images without masks; noisy maps
    that are higher on the defects."""
    rng = np.random.default_rng(seed)
    samples, maps, masks = [], [], []
    for i in range(n_bad + n_good):
        mask = np.zeros((size, size), dtype=bool)
        if i < n_bad:
            for _ in range(1 + i % 2):
                y, x, h, w = rng.integers(0, size - 8, 2).tolist() + rng.integers(2, 8, 2).tolist()
                mask[y:y + h, x:x + w] = True
            mpath = _write_mask(tmp_path / f"{i}_mask.png", mask)
            samples.append(Sample(tmp_path / f"{i}.png", 1, "defect", "test", mpath))
        else:
            samples.append(Sample(tmp_path / f"{i}.png", 0, "good", "test", None))
        maps.append((rng.normal(size=(size, size)) + 1.5 * mask).astype(np.float32))
        masks.append(mask)
    return samples, maps, masks


def _exact_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """Reference: every distinct score as a threshold, PRO averaged over 8-connected regions."""
    scores = np.concatenate([m.ravel() for m in maps])
    neg = np.concatenate([m[~g] for m, g in zip(maps, masks)])
    regions = []
    for m, g in zip(maps, masks):
        lab, k = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[lab == j] for j in range(1, k + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.sort(np.unique(scores))[::-1]:
        fprs.append(float((neg >= t).mean()))
        pros.append(float(np.mean([(r >= t).mean() for r in regions])))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = fprs[keep], pros[keep]
    j = int(keep.sum())
    yl = y[-1] + (pros[j] - y[-1]) * (limit - x[-1]) / (fprs[j] - x[-1])
    x, y = np.append(x, limit), np.append(y, yl)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / limit)


def test_matches_exact_references(tmp_path):
    samples, maps, masks = _dataset(tmp_path)
    m = pixel_metrics(samples, maps, resolution=None)
    labels = np.concatenate([g.ravel() for g in masks])
    scores = np.concatenate([s.ravel() for s in maps])
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=2e-4)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=2e-3)
    assert m["aupro"] == pytest.approx(_exact_aupro(maps, masks), abs=2e-3)
    assert m["pixel_images"] == 7 and m["defect_regions"] == 6


def test_perfect_and_random_maps(tmp_path):
    samples, _, masks = _dataset(tmp_path, seed=1)
    perfect = pixel_metrics(samples, [g.astype(np.float32) for g in masks], resolution=None)
    assert perfect["pixel_auroc"] == pytest.approx(1.0) and perfect["aupro"] == pytest.approx(1.0)
    rng = np.random.default_rng(5)
    noise = pixel_metrics(samples, [rng.random(g.shape).astype(np.float32) for g in masks], resolution=None)
    assert abs(noise["pixel_auroc"] - 0.5) < 0.05
    assert noise["aupro"] < 0.25  # a random map covers regions about as much as it covers normal pixels


def test_compares_at_the_stated_resolution(tmp_path):
    """Smooth maps and masks at 128 px compared at 64 px: about the same ranking quality."""
    samples, maps, masks = _dataset(tmp_path, size=128, seed=2)
    maps = [ndimage.gaussian_filter(m, 4) for m in maps]
    m = pixel_metrics(samples, maps, resolution=64)
    assert m["pixel_resolution"] == 64
    assert 0.7 < m["pixel_auroc"] <= 1.0
    big = pixel_metrics(samples, maps, resolution=None)
    assert m["pixel_auroc"] == pytest.approx(big["pixel_auroc"], abs=0.02)


def test_skips_anomalous_images_without_masks(tmp_path):
    samples, maps, _ = _dataset(tmp_path, seed=3)
    samples[0] = Sample(samples[0].path, 1, "defect", "test", None)
    m = pixel_metrics(samples, maps, resolution=None)
    assert m["pixel_images_skipped"] == 1 and m["pixel_images"] == 6
    only_good = pixel_metrics(samples[4:], maps[4:], resolution=None)
    assert only_good["pixel_auroc"] is None and only_good["aupro"] is None


def test_bad_inputs_give_clear_errors(tmp_path):
    samples, maps, _ = _dataset(tmp_path, seed=4)
    with pytest.raises(InsightADError, match="7 samples but 6 maps"):
        pixel_metrics(samples, maps[:-1])
    wrong = [np.zeros((16, 20), np.float32)] + maps[1:]  # the image (as its map says) is 20x16, the mask 32x32
    with pytest.raises(InsightADError, match=r"0_mask\.png: mask is 32x32 but the image .* is 20x16"):
        pixel_metrics(samples, wrong)
