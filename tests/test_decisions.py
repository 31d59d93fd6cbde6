"""Decisions right after training: false-alarm-capped thresholds with a tail model, Wilson intervals,
synthetic recall, the decision record."""

from __future__ import annotations

import numpy as np
import pytest

from insightad.decide.decisions import (
    DecisionRecord,
    decide,
    fit_tail,
    fpr_threshold,
    pixel_threshold,
    wilson_interval,
)
from insightad.errors import InsightADError


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(1, 20)
    assert lo == pytest.approx(0.00889, abs=1e-4) and hi == pytest.approx(0.2361, abs=1e-3)
    lo, hi = wilson_interval(0, 50)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.0714, abs=1e-3)


def test_perfect_detector_gets_a_threshold_between_the_distributions():
    rng = np.random.default_rng(0)
    normal = rng.normal(1.0, 0.1, 200)
    defects = rng.normal(5.0, 0.3, 200)
    for strategy in ("fpr", "f1-synthetic"):
        rec = decide(strategy, normal, defects, ["blob"] * 200)
        assert normal.max() * 0.9 < rec.threshold < defects.min(), strategy
        assert rec.synthetic_recall == 1.0 and rec.synthetic_auroc == 1.0
        assert rec.recall_by_kind == {"blob": 1.0}


@pytest.mark.parametrize("n", [30, 60, 400])
@pytest.mark.parametrize("dist", ["normal", "gamma"])
def test_false_alarm_cap_holds_on_generated_data(n, dist):
    """Over many draws, new normals exceed the chosen threshold at about the capped rate, not more
    than the cap plus sampling slack (and never wildly more, even from 30 normals: the tail model)."""
    rate, rates = 0.02, []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        def draw(k: int, rng: np.random.Generator = rng) -> np.ndarray:
            return rng.normal(0, 1, k) if dist == "normal" else rng.gamma(2.0, 1.0, k)

        t, _ = fpr_threshold(draw(n), rate)
        rates.append((draw(20000) > t).mean())
    assert np.mean(rates) <= rate * 1.6, (np.mean(rates), n, dist)  # average false-alarm rate near the cap
    assert np.mean(rates) >= rate * 0.25  # and not absurdly conservative


def test_tail_model_used_below_one_over_rate():
    rng = np.random.default_rng(1)
    assert fit_tail(rng.normal(size=30), 0.02).kind in ("gpd", "normal")
    assert fit_tail(rng.normal(size=50), 0.02).kind == "empirical"
    _t, tail = fpr_threshold(rng.normal(size=30), 0.02)
    assert tail.kind in ("gpd", "normal")
    rec = decide("fpr", rng.normal(size=30))
    assert rec.warnings and "validation normals" in rec.warnings[0]
    assert rec.false_alarm_interval[0] <= rec.false_alarm_rate <= rec.false_alarm_interval[1]


def test_empirical_threshold_allows_the_capped_count():
    s = np.arange(100, dtype=float)
    t, tail = fpr_threshold(s, 0.02)  # (m + 1) / 101 <= 0.02: one normal may lie above
    assert tail.kind == "empirical" and t == 98.0 and (s > t).sum() == 1


def test_record_round_trips_and_summarises():
    rng = np.random.default_rng(2)
    rec = decide("percentile", rng.normal(size=80), rng.normal(3, 1, 80), ["crack", "blob"] * 40)
    back = DecisionRecord.from_dict(rec.to_dict())
    assert back == rec
    assert back.summary().startswith("expected false alarms ") and "recall on synthetic defects" in back.summary()
    assert set(rec.recall_by_kind) == {"crack", "blob"}


def test_low_synthetic_recall_warns_and_bad_input_is_named():
    rng = np.random.default_rng(3)
    rec = decide("fpr", rng.normal(size=100), rng.normal(size=100))
    assert any("recall on synthetic defects" in w for w in rec.warnings)
    with pytest.raises(InsightADError, match="threshold strategy"):
        decide("magic", np.ones(3))
    with pytest.raises(InsightADError, match="max_false_alarms"):
        fpr_threshold(np.ones(3), 1.5)
    with pytest.raises(InsightADError, match="not finite"):
        decide("fpr", np.array([1.0, np.nan]))


def test_pixel_threshold_separates_masked_pixels():
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    amap = np.where(mask, 2.0, 0.5).astype(np.float32)
    t = pixel_threshold([amap], [mask])
    assert 0.5 <= t < 2.0
    assert pixel_threshold([amap], [np.zeros_like(mask)]) is None


def test_pixel_threshold_samples_each_map_alike():
    """Past ``max_pixels`` the sweep reads the same share of every map (drawn map by map, deterministic) and
    lands where the full sweep does; maps and masks that do not pair up are refused."""
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for i in range(30):
        mask = np.zeros((40, 40), bool)
        mask[5 + i % 10:15 + i % 10, 8:20] = True
        maps.append((rng.normal(0.0, 1.0, mask.shape) + 3.0 * mask).astype(np.float32))
        masks.append(mask)
    full = pixel_threshold(maps, masks, max_pixels=10**9)
    sampled = pixel_threshold(maps, masks, max_pixels=6000)
    assert sampled == pixel_threshold(maps, masks, max_pixels=6000)
    assert full is not None and sampled is not None and abs(sampled - full) < 0.25
    from insightad.decide.decisions import _pixel_sample

    values, truth = _pixel_sample(maps, masks, 6001, 0)
    assert values.size == truth.size == 6001 and truth.sum() == pytest.approx(6001 * 120 / 1600, rel=0.1)
    with pytest.raises(InsightADError, match="3200 map pixels in 2 maps for 1600 mask pixels in 1 masks"):
        pixel_threshold(maps[:2], masks[:1])
    with pytest.raises(InsightADError, match="for 3240 mask pixels in 2 masks"):
        pixel_threshold(maps[:2], [masks[0], np.ones((40, 41), bool)])
