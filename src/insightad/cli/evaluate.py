"""insightad evaluate: metrics of a model on held-out or new labelled images."""

from __future__ import annotations

import argparse

from insightad.cli.common import (
    add_data_flags,
    add_engine_flags,
    add_model_flag,
    add_progress_flag,
    add_work_flags,
    data_params,
    load_inference_model,
    new_parser,
    parse_threshold,
    print_json,
    with_config,
)
from insightad.cli.options import path_arg
from insightad.config import check_resampling


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "evaluate", "image AUROC, AP, accuracy/precision/recall/F1 at the threshold",
                   "Evaluate a model on --data. On the dataset it was trained on, only held-out normal "
                   "images (or the MVTec test split) and anomalous images are scored; on another path "
                   "every image is; training images are always refused.")
    add_model_flag(p)
    add_data_flags(p, seed_help="seed of --report's balanced/unbalanced draws (default: 0)")
    p.add_argument("--threshold", metavar="VALUE|FILE.json", type=path_arg, help="override the model's threshold")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    p.add_argument("--report", metavar="DIR", type=path_arg, help="write the full report into DIR: metrics.json, "
                   "report.md, ROC/PR curves, score histogram, per-defect table and plot, balanced/unbalanced figures, "
                   "worst cases")
    p.add_argument("--prevalence", type=float, default=0.05, metavar="P",
                   help="share of defective images in the unbalanced report (default: 0.05)")
    p.add_argument("--draws", type=int, default=10, metavar="N",
                   help="seeded draws averaged in the balanced/unbalanced reports (default: 10)")
    add_engine_flags(p)
    add_work_flags(p)
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "evaluate"), _argv=argv)


def format_table(m: dict) -> str:
    from insightad.evaluate.metrics import pixel_coverage, undefined_text

    rows = [("images", f"{m['n_normal']} normal, {m['n_anomalous']} anomalous")]
    for key in ("image_auroc", "average_precision", "pixel_auroc", "aupro", "accuracy", "precision",
                "recall", "f1", "threshold"):
        if key in m:
            v = m[key]
            rows.append((key, f"{v:.4f}" if v is not None else undefined_text(m, key)))
        if key == "aupro" and m.get("pixel_images_skipped"):
            rows.append(("pixel_images", pixel_coverage(m)))
    return "\n".join(f"{k:<18} {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from insightad.evaluate.run import evaluate_model, prefetch_metrics

    prefetch_metrics()  # scikit-learn's import overlaps the model's load and the scoring
    check_resampling(args.prevalence, args.draws)  # with or without --report: a bad value is a typo either way
    if args.report:
        from insightad.outputs import check_output_dir

        check_output_dir(args.report, "--report", inputs=[args.data])  # its PNGs must not become test images
    thr = parse_threshold(args.threshold, args.model)  # a wrong threshold file fails before the model loads
    if not args.report:
        return _print(args, evaluate_model(load_inference_model(args), args.data, data_params(args), thr,
                                           args.progress), None)
    from insightad.evaluate.report import report_folder, write_report

    with report_folder(args.report):  # before the work: a second run on this --report is refused at once
        det = load_inference_model(args)
        dp = data_params(args)
        ev = evaluate_model(det, args.data, dp, thr, args.progress)
        report = write_report(det, ev, args.report, prevalence=args.prevalence, draws=args.draws, seed=dp.seed,
                              model_path=args.model, data=args.data, held=True)
    ev.metrics["balanced"], ev.metrics["unbalanced"] = report["balanced"], report["unbalanced"]
    return _print(args, ev, report)


def _print(args: argparse.Namespace, ev, report: dict | None) -> int:
    """The metrics (a table, or one JSON object), and the report's lines where one was written."""
    if args.json:
        print_json(ev.metrics)
    else:
        print(format_table(ev.metrics))
        if report is not None:
            print(format_resampled(report))
            print(f"report written to {args.report} (open report.md)")
    return 0


def format_resampled(report: dict) -> str:
    """The balanced/unbalanced lines (mean ± std over the draws)."""
    from insightad.evaluate.report import mean_std_text

    lines = []
    for kind in ("balanced", "unbalanced"):
        r = report[kind]
        if not r.get("available"):  # said, not a blank line
            lines.append(f"[{kind.capitalize()}] n/a ({r.get('reason', 'not computed')})")
            continue
        vals = ", ".join(f"{k}={mean_std_text(r, k)}" for k in ("auc", "accuracy", "precision", "recall", "f1"))
        lines.append(f"[{kind.capitalize()}] {r['n_normal']} normal + {r['n_anomalous']} defective, "
                     f"{r['draws']} draws: {vals}")
    return "\n".join(lines)
