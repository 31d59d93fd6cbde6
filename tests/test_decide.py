"""Threshold strategies and score_normalized: exact on hand-made scores, optimal against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from insightad.decide import (
    choose_threshold,
    f1_threshold,
    min_normals_for,
    normalize_scores,
    percentile_threshold,
    robust_scale,
    youden_threshold,
)
from insightad.errors import InsightADError


def _brute(labels, scores, objective):
    """Best objective over thresholds placed at every score and just below the smallest."""
    cands = np.concatenate([np.unique(scores), [scores.min() - 1.0]])
    best = -np.inf
    for t in cands:
        pred = scores > t
        tp, fp = (pred & labels).sum(), (pred & ~labels).sum()
        fn = (~pred & labels).sum()
        best = max(best, objective(tp, fp, fn, labels))
    return best


def _f1(tp, fp, fn, y):
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _j(tp, fp, fn, y):
    return tp / y.sum() - fp / (~y).sum()


def test_percentile_is_numpy_percentile_and_flags_the_share_asked():
    s = np.arange(100, dtype=float)
    c = percentile_threshold(s, 95)
    assert c.value == pytest.approx(np.percentile(s, 95))
    assert c.strategy == "percentile" and c.warnings == []
    assert c.details["false_alarm_rate"] == pytest.approx(0.05)


def test_percentile_warns_when_too_few_normals():
    assert min_normals_for(95) == 20 and min_normals_for(99) == 100 and min_normals_for(100) == 1
    c = percentile_threshold(np.linspace(0, 1, 10), 95)
    assert len(c.warnings) == 1 and "only 10 normal images for the 95th percentile" in c.warnings[0]
    assert "at least 20" in c.warnings[0]
    assert percentile_threshold(np.linspace(0, 1, 20), 95).warnings == []


@pytest.mark.parametrize("seed", range(5))
def test_f1_and_youden_are_optimal(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(40, bool), np.ones(15, bool)]
    s = np.r_[rng.normal(0, 1, 40), rng.normal(1.5, 1, 15)].round(2)  # rounding makes ties
    f = f1_threshold(y, s)
    assert _f1(((s > f.value) & y).sum(), ((s > f.value) & ~y).sum(), ((s <= f.value) & y).sum(), y) == \
        pytest.approx(_brute(y, s, _f1))
    assert f.details["f1"] == pytest.approx(_brute(y, s, _f1))
    j = youden_threshold(y, s)
    assert (s > j.value)[y].mean() - (s > j.value)[~y].mean() == pytest.approx(_brute(y, s, _j))
    assert not np.isin(j.value, s) and not np.isin(f.value, s)  # half-way: '>' and '>=' agree


def test_separable_scores_threshold_between_classes():
    y = np.array([0, 0, 0, 1, 1], bool)
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    for c in (f1_threshold(y, s), youden_threshold(y, s)):
        assert c.value == pytest.approx(0.5)
    assert youden_threshold(y, s).details["youden_j"] == 1.0


@pytest.mark.parametrize("fn", [f1_threshold, youden_threshold])
def test_labelled_strategies_need_both_classes(fn):
    with pytest.raises(InsightADError, match="needs both normal and defective images, found no defective"):
        fn(np.zeros(5, bool), np.arange(5.0))


def test_bad_inputs():
    with pytest.raises(InsightADError, match="percentile: expected a value between 0 and 100"):
        percentile_threshold(np.ones(3), 101)
    with pytest.raises(InsightADError, match="no normal images"):
        percentile_threshold(np.array([]), 95)
    with pytest.raises(InsightADError, match="not finite"):
        percentile_threshold(np.array([1.0, np.nan]), 95)
    with pytest.raises(InsightADError, match="strategy: expected one of percentile, f1, youden"):
        choose_threshold("roc", np.ones(3), np.array([0, 1, 0]))


def test_normalized_is_monotone_with_threshold_at_half():
    s = np.array([-1.0, 0.0, 0.2, 0.5, 0.8, 3.0, np.nan])
    n = normalize_scores(s, 0.5, 0.1)
    assert n[3] == pytest.approx(0.5)
    assert np.all(np.diff(n[:-1]) > 0) and np.isnan(n[-1])
    assert n[4] == pytest.approx(1 / (1 + np.exp(-3)))
    # no scale known: |threshold| / 4
    assert normalize_scores(np.array([1.0]), 0.5)[0] == pytest.approx(1 / (1 + np.exp(-4)))
    assert robust_scale(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 3.0) == pytest.approx(2.0 / 1.349)


def test_prediction_carries_normalized_scores(baseline_model, mvtec_dir):
    from insightad.model_file import load_model

    det = load_model(baseline_model)
    paths = sorted((mvtec_dir / "test" / "good").glob("*.png"))[:3] + sorted((mvtec_dir / "test" / "blob").glob("*.png"))[:2]
    pred = det.predict(paths, maps=False)
    assert np.array_equal(pred.scores_normalized > 0.5, pred.labels)
    again = det.predict(paths, maps=False, threshold=float(np.median(pred.scores)))
    assert np.array_equal(again.scores, pred.scores)  # raw scores never change
    assert (again.scores_normalized > 0.5).sum() == 2
