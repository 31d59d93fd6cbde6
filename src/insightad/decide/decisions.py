"""Decisions that hold right after training: a threshold chosen on out-of-fold normal scores and
synthetic defects, with the false-alarm rate and recall expected at it (numpy / scipy only).

Strategies (``anomalous = score > threshold`` everywhere):

- ``fpr``: the lowest threshold whose estimated false-alarm rate on out-of-fold normals is at most
  ``max_false_alarms``. With enough normals the estimate is empirical: at a threshold with m of
  n normals above it, (m + 1) / (n + 1), the expected share of new normals above the
  (m+1)-th largest of n scores (the raw fraction m / n would be optimistic); with fewer than
  ``1 / rate``, the top of the normal scores is modelled by a generalised
  Pareto tail (a normal tail when there are too few points for it), so the threshold does not
  collapse to "the largest normal score seen".
- ``f1-synthetic``: the best F1 separating out-of-fold normals from synthetic defects.
- ``percentile``: a percentile of the out-of-fold normal scores.

Whatever the strategy, the record states the false-alarm rate estimated at the chosen threshold
with a Wilson 95% interval, the recall on synthetic defects (overall and per kind), their AUROC,
and a pixel threshold chosen on the synthetic masks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from insightad.decide.thresholds import f1_threshold
from insightad.errors import InsightADError

DECISION_STRATEGIES = ("fpr", "f1-synthetic", "percentile")
DEFAULT_MAX_FALSE_ALARMS = 0.02
Z95 = 1.959963984540054
MIN_TAIL_POINTS = 10  # exceedances a generalised Pareto fit needs; fewer: a normal tail
LOW_RECALL = 0.5  # synthetic recall under this earns a warning


# ------------------------------------------------------------------------------ intervals
def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (``successes`` may be fractional, e.g. a modelled count)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half)."""
    from scipy.stats import rankdata

    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (neg.size * pos.size))


# ------------------------------------------------------------------------------ tail model
@dataclass(frozen=True)
class TailModel:
    """P(score > t) for normal images: empirical below ``u``, a fitted tail above it.

    ``kind`` is ``gpd`` (generalised Pareto on the exceedances over ``u``), ``normal`` (a normal
    distribution fitted to all scores, used above ``u`` when there are too few exceedances) or
    ``empirical`` (enough normals: no model).
    """

    kind: str
    u: float
    p_u: float  # fraction of normal scores above u
    shape: float = 0.0
    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def exceedance(self, t: float) -> float | None:
        """Modelled P(score > t), or None where the empirical fraction applies (t below u)."""
        if self.kind == "empirical" or t < self.u:
            return None
        from scipy import stats

        if self.kind == "gpd":
            return float(self.p_u * stats.genpareto.sf(t - self.u, self.shape, loc=0.0, scale=self.scale))
        return float(stats.norm.sf(t, self.mean, self.std))

    def quantile(self, rate: float) -> float:
        """The threshold t with modelled P(score > t) = rate (rate < p_u)."""
        from scipy import stats

        if self.kind == "gpd":
            return float(self.u + stats.genpareto.isf(rate / self.p_u, self.shape, loc=0.0, scale=self.scale))
        return float(max(stats.norm.isf(rate, self.mean, self.std), self.u))


def fit_tail(normal_scores: np.ndarray, rate: float) -> TailModel:
    """The tail model for these out-of-fold normal scores at a target false-alarm ``rate``."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = s.size
    if 1.0 / (n + 1) <= rate:
        return TailModel("empirical", u=float(s[-1]), p_u=0.0)
    m = min(n - 1, max(MIN_TAIL_POINTS, math.ceil(0.25 * n)))  # exceedances over u
    u = float(s[n - 1 - m]) if m > 0 else float(s[-1])
    p_u = m / n
    std = float(s.std(ddof=1)) if n > 1 else 0.0
    std = std if std > 0 else max(abs(float(s.mean())) * 1e-3, 1e-12)
    exc = s[n - m:] - u
    if m >= MIN_TAIL_POINTS and exc.max() > 0:
        from scipy import stats

        shape, _, scale = stats.genpareto.fit(exc, floc=0.0)
        # small samples: bound the shape so one extreme score cannot make the tail absurd
        shape = float(np.clip(shape, -0.5, 0.5))
        if scale > 0 and np.isfinite(scale):
            return TailModel("gpd", u=u, p_u=p_u, shape=shape, scale=float(scale), mean=float(s.mean()), std=std)
    return TailModel("normal", u=u, p_u=p_u, mean=float(s.mean()), std=std)


def false_alarm_rate(normal_scores: np.ndarray, threshold: float, tail: TailModel | None = None) -> float:
    """Estimated P(normal score > threshold): the tail model above its ``u``, else (m + 1) / (n + 1)
    with m of the n normal scores above the threshold."""
    s = np.asarray(normal_scores, dtype=np.float64)
    if tail is not None:
        modelled = tail.exceedance(threshold)
        if modelled is not None:
            return modelled
    return float(((s > threshold).sum() + 1) / (s.size + 1)) if s.size else float("nan")


# ------------------------------------------------------------------------------ record
@dataclass
class DecisionRecord:
    """How the threshold was chosen and what to expect at it (kept in the model file as JSON)."""

    strategy: str
    threshold: float
    max_false_alarms: float | None
    false_alarm_rate: float
    false_alarm_interval: tuple[float, float]
    false_alarm_model: str
    n_normal: int
    synthetic_recall: float | None = None
    synthetic_recall_interval: tuple[float, float] | None = None
    n_synthetic: int = 0
    recall_by_kind: dict[str, float] = field(default_factory=dict)
    synthetic_auroc: float | None = None
    pixel_threshold: float | None = None
    validation: str = "out-of-fold"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["false_alarm_interval"] = list(self.false_alarm_interval)
        if self.synthetic_recall_interval is not None:
            d["synthetic_recall_interval"] = list(self.synthetic_recall_interval)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecisionRecord:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            rec = cls(**known)
        except TypeError as e:
            raise InsightADError(f"threshold.decision: {e}") from None
        rec.false_alarm_interval = tuple(rec.false_alarm_interval)  # type: ignore[assignment]
        if rec.synthetic_recall_interval is not None:
            rec.synthetic_recall_interval = tuple(rec.synthetic_recall_interval)  # type: ignore[assignment]
        return rec

    def summary(self) -> str:
        """One line for ``train``: "expected false alarms 1.8% (0.6-4.9%), recall on synthetic defects 92%"."""
        lo, hi = self.false_alarm_interval
        line = f"expected false alarms {100 * self.false_alarm_rate:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}%)"
        if self.synthetic_recall is not None:
            line += f", recall on synthetic defects {100 * self.synthetic_recall:.0f}%"
        return line


# ------------------------------------------------------------------------------ choosing
def _finite(a: np.ndarray | None, what: str) -> np.ndarray:
    s = np.asarray([] if a is None else a, dtype=np.float64).ravel()
    if not np.isfinite(s).all():
        raise InsightADError(f"{what}: {int((~np.isfinite(s)).sum())} scores are not finite numbers")
    return s


def fpr_threshold(normal_scores: np.ndarray, rate: float = DEFAULT_MAX_FALSE_ALARMS) -> tuple[float, TailModel]:
    """The lowest threshold whose estimated false-alarm rate is at most ``rate``, and the tail model used."""
    if not 0 < rate < 1:
        raise InsightADError(f"max_false_alarms: expected a rate between 0 and 1 (e.g. 0.02), got {rate!r}")
    s = np.sort(_finite(normal_scores, "fpr"))
    if s.size == 0:
        raise InsightADError("fpr: no normal scores to choose a threshold on")
    tail = fit_tail(s, rate)
    allowed = math.floor(rate * (s.size + 1) + 1e-9) - 1  # normals allowed above: (m + 1) / (n + 1) <= rate
    if tail.kind == "empirical" or (allowed >= 0 and rate >= tail.p_u):
        return float(s[s.size - 1 - allowed]), tail
    return tail.quantile(rate), tail


def recall_at(defect_scores: np.ndarray, threshold: float) -> float:
    """Fraction of defective scores above the threshold."""
    d = np.asarray(defect_scores, dtype=np.float64)
    return float((d > threshold).mean()) if d.size else float("nan")


def _pixel_sample(maps: list[np.ndarray], masks: list[np.ndarray], max_pixels: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(values float32, truth bool) of at most ``max_pixels`` map pixels, the same share of each map (a fixed
    random subset: the sweep stays cheap and deterministic). Drawn map by map: all maps' pixels at once and a
    permutation of their indices (13.7 million for 209 maps at 256 px) made 190 MB of temporaries."""
    total = sum(int(np.size(m)) for m in maps)
    if total <= max_pixels:
        return (np.concatenate([np.asarray(m, np.float32).ravel() for m in maps]),
                np.concatenate([np.asarray(k, bool).ravel() for k in masks]))
    rng = np.random.default_rng(seed)
    sizes = np.array([np.size(m) for m in maps])
    quota = np.floor(sizes * (max_pixels / total)).astype(int)
    quota[np.argsort(-(sizes * (max_pixels / total) - quota), kind="stable")[:max_pixels - int(quota.sum())]] += 1
    values, truth = np.empty(max_pixels, np.float32), np.empty(max_pixels, bool)
    at = 0
    for m, k, q in zip(maps, masks, quota):
        keep = rng.choice(np.size(m), int(q), replace=False)
        values[at:at + q] = np.asarray(m, np.float32).ravel()[keep]
        truth[at:at + q] = np.asarray(k, bool).ravel()[keep]
        at += q
    return values, truth


def pixel_threshold(maps: list[np.ndarray], masks: list[np.ndarray], max_pixels: int = 2_000_000,
                    seed: int = 0) -> float | None:
    """The pixel level with the best pixel F1 on synthetic defects with exact masks (None without any)."""
    if not maps or not any(np.asarray(m).any() for m in masks):
        return None
    if len(maps) != len(masks) or any(np.size(m) != np.size(k) for m, k in zip(maps, masks)):
        raise InsightADError(f"pixel threshold: {sum(np.size(m) for m in maps)} map pixels in {len(maps)} maps for "
                             f"{sum(np.size(k) for k in masks)} mask pixels in {len(masks)} masks")
    values, truth = _pixel_sample(maps, masks, max_pixels, seed)
    pos, neg = np.sort(values[truth]), np.sort(values[~truth])
    grid = np.unique(np.concatenate([np.quantile(pos, np.linspace(0.0, 1.0, 400)),
                                     np.quantile(neg, np.linspace(0.9, 1.0, 100)) if neg.size else []]))
    cands = np.concatenate([[grid[0] - 1e-6 * (abs(grid[0]) + 1)], (grid[:-1] + grid[1:]) / 2])
    tp = pos.size - np.searchsorted(pos, cands, side="right")
    fp = neg.size - np.searchsorted(neg, cands, side="right")
    f1 = 2 * tp / np.maximum(2 * tp + fp + (pos.size - tp), 1)
    return float(cands[int(np.argmax(f1))])


def decide(strategy: str, normal_scores: np.ndarray, synthetic_scores: np.ndarray | None = None,
           synthetic_kinds: list[str] | None = None, *, max_false_alarms: float = DEFAULT_MAX_FALSE_ALARMS,
           percentile: float = 99.0, synthetic_maps: list[np.ndarray] | None = None,
           synthetic_masks: list[np.ndarray] | None = None, validation: str = "out-of-fold") -> DecisionRecord:
    """Choose a threshold by ``strategy`` and state what to expect at it."""
    if strategy not in DECISION_STRATEGIES:
        raise InsightADError(f"threshold strategy: expected one of {', '.join(DECISION_STRATEGIES)}, got {strategy!r}")
    normal = _finite(normal_scores, "out-of-fold normal scores")
    synth = _finite(synthetic_scores, "synthetic defect scores")
    if normal.size == 0:
        raise InsightADError("decide: no out-of-fold normal scores")
    if synthetic_kinds is not None and len(synthetic_kinds) != synth.size:
        raise InsightADError(f"decide: {len(synthetic_kinds)} defect kinds for {synth.size} synthetic scores")
    warnings: list[str] = []
    tail = fit_tail(normal, max_false_alarms)
    if strategy == "fpr":
        value, tail = fpr_threshold(normal, max_false_alarms)
    elif strategy == "f1-synthetic":
        if synth.size == 0:
            raise InsightADError("f1-synthetic: no synthetic defect scores (use --threshold-strategy fpr)")
        choice = f1_threshold(np.r_[np.zeros(normal.size, bool), np.ones(synth.size, bool)], np.r_[normal, synth])
        value = choice.value
    else:
        value = float(np.percentile(normal, percentile))
    rate = false_alarm_rate(normal, value, tail)
    interval = wilson_interval(rate * normal.size, normal.size)
    need = math.ceil(1.0 / max_false_alarms - 1e-9)
    if normal.size < need:
        warnings.append(f"only {normal.size} validation normals: at least {need} are needed to measure a "
                        f"{100 * max_false_alarms:g}% false-alarm rate directly; the estimate uses a "
                        f"{tail.kind} tail model and is uncertain (add normal images)")
    rec = DecisionRecord(strategy, float(value), float(max_false_alarms), float(rate), interval, tail.kind,
                         int(normal.size), validation=validation, warnings=warnings)
    if synth.size:
        hits = synth > value
        rec.synthetic_recall = float(hits.mean())
        rec.synthetic_recall_interval = wilson_interval(float(hits.sum()), synth.size)
        rec.n_synthetic = int(synth.size)
        rec.synthetic_auroc = auroc(normal, synth)
        if synthetic_kinds is not None:
            kinds = np.asarray(synthetic_kinds)
            rec.recall_by_kind = {str(k): float(hits[kinds == k].mean()) for k in sorted(set(synthetic_kinds))}
        if rec.synthetic_recall < LOW_RECALL:
            warnings.append(f"recall on synthetic defects is only {100 * rec.synthetic_recall:.0f}% at this "
                            "threshold: many real defects may be missed (try another method, more training "
                            "images, or a looser --max-false-alarms)")
    if synthetic_maps is not None and synthetic_masks is not None:
        rec.pixel_threshold = pixel_threshold(synthetic_maps, synthetic_masks)
    return rec
