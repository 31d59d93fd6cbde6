"""insightad evaluate: metrics of a model on held-out or new labelled images."""

from __future__ import annotations

import argparse

from insightad.cli.common import (add_engine_flags, load_inference_model, add_data_flags, add_model_flag, add_progress_flag, data_params, new_parser,
                                  parse_threshold, print_json, with_config)


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "evaluate", "image AUROC, AP, accuracy/precision/recall/F1 at the threshold",
                   "Evaluate a model on --data. On the dataset it was trained on, only held-out normal "
                   "images (or the MVTec test split) and anomalous images are scored; on another path "
                   "every image is; training images are always refused.")
    add_model_flag(p)
    add_data_flags(p)
    p.add_argument("--threshold", metavar="VALUE|FILE.json", help="override the model's threshold")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    add_engine_flags(p)
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "evaluate"), _argv=argv)


def format_table(m: dict) -> str:
    rows = [("images", f"{m['n_normal']} normal, {m['n_anomalous']} anomalous")]
    for key in ("image_auroc", "average_precision", "pixel_auroc", "aupro", "accuracy", "precision",
                "recall", "f1", "threshold"):
        if key in m:
            v = m[key]
            rows.append((key, "n/a (needs normal and anomalous images)" if v is None else f"{v:.4f}"))
    return "\n".join(f"{k:<18} {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from insightad.evaluate.run import evaluate_model
    det = load_inference_model(args)
    ev = evaluate_model(det, args.data, data_params(args), parse_threshold(args.threshold), args.progress)
    if args.json:
        print_json(ev.metrics)
    else:
        print(format_table(ev.metrics))
    return 0
