#!/usr/bin/env python
"""Decisions right after training, measured: per dataset and method, the default threshold's precision,
recall, F1 next to f1_max, the estimated false-alarm rate (out-of-fold, Wilson 95%) next to the rate
measured on test normals (Wilson 95%), synthetic AUROC next to test AUROC, and ``--method auto``'s choice.

    nice -n 10 python benchmarks/decisions.py --data ../shared/data/mvtec_ad/bottle ../shared/data/concrete_crack

Splits (issue 13): MVTec: test/ is the test split; folder/crack layouts: ``--holdout 0.2 --seed 0``.
The candidates are fitted once, by auto (default budget and settings); a candidate auto skipped for
time is fitted afterwards for its own row (marked ``outside_budget``). One JSON line per dataset and
method, then one per dataset for auto, then a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def run_dataset(data: str, budget: float, methods: list[str]) -> list[dict]:
    from insightad.apps.auto import auto_fit, format_table
    from insightad.apps.train import split_record
    from insightad.config import DataParams, DecisionParams
    from insightad.data.layouts import discover, holdout_split
    from insightad.evaluate.run import evaluate_model
    from insightad.methods import create_detector
    from insightad.methods.crossfit import validate_and_decide

    dp = DataParams(holdout=0.2, seed=0)
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    train, held = holdout_split(ds, dp.holdout, dp.seed)
    paths = [s.path for s in train]
    decision = DecisionParams(candidates=methods, time_budget=budget)
    t0 = time.perf_counter()
    chosen, cands = auto_fit(paths, {}, decision, seed=0)
    auto_s = time.perf_counter() - t0
    print(format_table(chosen.selection_["candidates"], chosen.selection_["chosen"]), file=sys.stderr)
    rows = []
    for c in cands:
        det, outside = c.detector, False
        if det is None:
            outside = True
            det = create_detector(c.method).fit(paths)
            validate_and_decide(det, paths, decision.threshold_strategy, decision.max_false_alarms, decision.folds, 0)
        det.split_ = split_record(ds, train, held, dp)
        ev = evaluate_model(det, data, dp, progress=False)
        m = ev.metrics
        rec = det.threshold_info_["decision"]
        est = [rec["false_alarm_interval"][0], rec["false_alarm_interval"][1]]
        rows.append({
            "dataset": Path(data).name, "method": c.method, "outside_budget": outside,
            "n_train": len(paths), "n_test_normal": m["n_normal"], "n_test_anomalous": m["n_anomalous"],
            "threshold": det.threshold_, "strategy": det.threshold_strategy_, "validation": rec["validation"],
            "precision": m["precision"], "recall": m["recall"], "f1": m["f1"], "f1_max": m["f1_max"],
            "f1_ratio": (m["f1"] / m["f1_max"]) if m["f1_max"] else None,
            "far_estimated": rec["false_alarm_rate"], "far_estimated_ci": est,
            "far_model": rec["false_alarm_model"], "n_validation_normals": rec["n_normal"],
            "far_measured": m["false_alarm_rate"], "far_measured_ci": m["false_alarm_interval"],
            "far_intervals_overlap": _overlap(est, m["false_alarm_interval"]),
            "synthetic_recall": rec["synthetic_recall"], "recall_by_kind": rec["recall_by_kind"],
            "synthetic_auroc": rec["synthetic_auroc"], "test_auroc": m["image_auroc"],
            "pixel_auroc": m.get("pixel_auroc"), "fit_and_validate_s": c.row.get("fit_seconds"),
        })
    best = max(r["test_auroc"] for r in rows)
    pick = next(r for r in rows if r["method"] == chosen.selection_["chosen"])
    rows.append({"dataset": Path(data).name, "method": "auto", "chosen": pick["method"], "auto_seconds": round(auto_s, 1),
                 "test_auroc": pick["test_auroc"], "best_candidate_test_auroc": best,
                 "within_0.01_of_best": pick["test_auroc"] >= best - 0.01,
                 "far_intervals_overlap": pick["far_intervals_overlap"], "f1_ratio": pick["f1_ratio"],
                 "far_measured": pick["far_measured"], "far_estimated": pick["far_estimated"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--methods", nargs="+", default=["baseline", "padim", "patchcore"])
    ap.add_argument("--time-budget", type=float, default=300.0)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    a = ap.parse_args()
    all_rows = []
    for data in a.data:
        for r in run_dataset(data, a.time_budget, a.methods):
            line = json.dumps(r, default=float)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            all_rows.append(r)
    head = f"{'dataset':<15} {'method':<10} {'P':>6} {'R':>6} {'F1':>6} {'F1max':>6} {'F1/max':>6} " \
           f"{'FAR est (95%)':>20} {'FAR test (95%)':>20} {'synAUC':>7} {'AUROC':>7}"
    print(head, file=sys.stderr)
    for r in all_rows:
        if r["method"] == "auto":
            print(f"{r['dataset']:<15} auto -> {r['chosen']}: test AUROC {r['test_auroc']:.4f} (best "
                  f"{r['best_candidate_test_auroc']:.4f}), FAR intervals overlap: {r['far_intervals_overlap']}",
                  file=sys.stderr)
            continue
        fe, fm = r["far_estimated_ci"], r["far_measured_ci"]
        print(f"{r['dataset']:<15} {r['method']:<10} {r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f} "
              f"{r['f1_max']:>6.3f} {r['f1_ratio']:>6.3f} {r['far_estimated']:>6.3f} ({fe[0]:.3f}-{fe[1]:.3f}) "
              f"{r['far_measured']:>6.3f} ({fm[0]:.3f}-{fm[1]:.3f}) {r['synthetic_auroc']:>7.4f} "
              f"{r['test_auroc']:>7.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
