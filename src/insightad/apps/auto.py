"""``--method auto``: fit the candidate methods within a time budget and keep the one that best
separates synthetic defects from out-of-fold normals (synthetic AUROC; ties go to the faster)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from insightad.config import DecisionParams
from insightad.errors import InsightADError
from insightad.methods import Detector, create_detector, get_method, list_methods
from insightad.methods.crossfit import at_model_size, validate_and_decide

TIE = 0.005  # synthetic AUROCs closer than this count as a tie


@dataclass
class Candidate:
    """One fitted candidate and its row of the table."""

    method: str
    detector: Detector | None
    row: dict[str, Any]


def _params_for(method: str, common: dict[str, Any]) -> dict[str, Any]:
    """The shared hyper-parameters the user gave that this method has (its own defaults otherwise)."""
    names = {f.name for f in dataclasses.fields(get_method(method).Params)}
    return {k: v for k, v in common.items() if k in names}


def _size_mb(det: Detector) -> float:
    return sum(t.numel() * t.element_size() for t in det._model_as(nn.Module).state_dict().values()) / 2**20


def _predict_ms(det: Detector, images: Sequence, n: int = 8) -> float:
    arrays = at_model_size(det, list(images[:n]))
    det.predict(arrays[:1], maps=det.has_maps)  # warm-up
    t = time.perf_counter()
    det.predict(arrays, maps=det.has_maps)
    return 1000 * (time.perf_counter() - t) / max(len(arrays), 1)


def choose(rows: list[dict[str, Any]]) -> int:
    """Index of the best row: highest synthetic AUROC; within ``TIE`` of it, the fastest to fit."""
    ok = [i for i, r in enumerate(rows) if r.get("synthetic_auroc") is not None]
    if not ok:
        raise InsightADError("--method auto: no candidate finished within the time budget (raise --time-budget)")
    best = max(rows[i]["synthetic_auroc"] for i in ok)
    tied = [i for i in ok if rows[i]["synthetic_auroc"] >= best - TIE]
    return min(tied, key=lambda i: rows[i]["fit_seconds"])


def auto_fit(images: Sequence, common: dict[str, Any], decision: DecisionParams, seed: int = 0,
             progress: bool = False, factory: Callable[[str, dict[str, Any]], Detector] | None = None,
             log: Callable[[str], None] | None = None) -> tuple[Detector, list[Candidate]]:
    """Fit every candidate (in the order given) until the budget is spent; returns the chosen detector
    (with the table in ``selection_``) and all candidates."""
    repeated = [m for i, m in enumerate(decision.candidates) if m in decision.candidates[:i]]
    if repeated:  # it was fitted twice, and both rows of the table said "<- chosen"
        raise InsightADError(f"--candidates: {repeated[0]!r} is listed twice; expected each method once, got "
                             f"{','.join(decision.candidates)}")
    if factory is None:
        factory = lambda m, p: create_detector(m, **_params_for(m, p))
        unknown = [m for m in decision.candidates if m not in list_methods()]
        if unknown:
            m = unknown[0]
            raise InsightADError(f"--candidates: unknown method {m!r} (available: {', '.join(list_methods())})")
    start = time.perf_counter()
    out: list[Candidate] = []
    for m in decision.candidates:
        spent = time.perf_counter() - start
        if spent >= decision.time_budget and any(c.detector is not None for c in out):
            out.append(Candidate(m, None, {"method": m, "synthetic_auroc": None, "fit_seconds": None,
                                           "skipped": f"time budget spent ({spent:.0f} s)"}))
            continue
        if log:
            log(f"auto: fitting {m}")
        t = time.perf_counter()
        det = factory(m, common)
        det.fit(list(images), progress=progress)
        _, rec = validate_and_decide(det, images, decision.threshold_strategy, decision.max_false_alarms,
                                     decision.folds, seed, decision.refit_folds)
        fit_s = time.perf_counter() - t
        row = {"method": m, "synthetic_auroc": rec.synthetic_auroc, "fit_seconds": round(fit_s, 2),
               "predict_ms_per_image": round(_predict_ms(det, images), 2), "size_mb": round(_size_mb(det), 2),
               "false_alarm_rate": rec.false_alarm_rate, "synthetic_recall": rec.synthetic_recall}
        out.append(Candidate(m, det, row))
    rows = [c.row for c in out]
    i = choose(rows)
    chosen = out[i].detector
    assert chosen is not None
    chosen.selection_ = {"chosen": out[i].method, "by": "synthetic_auroc (ties within 0.005: fastest fit)",
                         "time_budget_s": decision.time_budget,
                         "seconds": round(time.perf_counter() - start, 2), "candidates": rows}
    return chosen, out


def format_table(rows: list[dict[str, Any]], chosen: str) -> str:
    """The candidates as a small text table. Its seconds are the fit and the out-of-fold validation together
    (``fit_seconds`` of the row): more than the fit alone that train and the demo print afterwards."""
    lines = [f"{'method':<12} {'synth AUROC':>11} {'fit+val s':>9} {'predict ms':>10} {'size MB':>8}"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['method']:<12} {'-':>11} {'-':>9} {'-':>10} {'-':>8}  skipped: {r['skipped']}")
            continue
        mark = "  <- chosen" if r["method"] == chosen else ""
        auc = r["synthetic_auroc"]
        lines.append(f"{r['method']:<12} {auc if auc is not None else float('nan'):>11.4f} {r['fit_seconds']:>9.1f} "
                     f"{r['predict_ms_per_image']:>10.1f} {r['size_mb']:>8.1f}{mark}")
    return "\n".join(lines)


__all__ = ["Candidate", "auto_fit", "choose", "format_table"]
