"""insightad demo: synthetic defects -> train -> evaluate -> example images, offline, in a few minutes."""

from __future__ import annotations

import argparse
import time

from insightad.cli.common import add_progress_flag, new_parser, print_json, with_config
from insightad.cli.options import path_arg

# --method auto's fitting budget in the demo; a candidate started within it runs to the end (the whole demo
# took 105 s and 150 s on a 2-core machine shared with other work, baseline and padim fitted)
DEMO_BUDGET_S = 60.0


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "demo", "run the whole pipeline on generated images (no data needed)",
                   "Generate a synthetic MVTec-style dataset (objects with scratches, blobs, cracks and "
                   "missing pieces), train with --method auto on its good images, evaluate on "
                   "its test images, and write example images.")
    p.add_argument("--out", "--output", dest="out", default="insightad-demo", metavar="DIR", type=path_arg,
                   help="folder for data, model and examples (default: insightad-demo)")
    from insightad.methods import list_methods

    p.add_argument("--method", "--mode", dest="method", default="auto", choices=[*list_methods(), "auto"],
                   help="method (default: auto, the best of baseline, padim and patchcore on synthetic defects)")
    p.add_argument("--kind", default="disc",
                   help="synthetic product: disc, plate, arrow, grid, stripes, weave (default: disc)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated data (default: 0)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object (default: off)")
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "demo"), _argv=argv)


def run(args: argparse.Namespace) -> int:
    from insightad.apps.train import train_model
    from insightad.cli.evaluate import format_table
    from insightad.config import DataParams, DecisionParams
    from insightad.data.synthetic import write_dataset
    from insightad.evaluate.examples import write_examples
    from insightad.evaluate.run import evaluate_model
    from insightad.outputs import check_output_dir

    t0 = time.perf_counter()
    out = check_output_dir(args.out, "--out")
    method = args.method
    data = write_dataset(out / "data", kind=args.kind, layout="mvtec", n_train=60, n_test_good=16,
                         n_per_defect=6, size=128, seed=args.seed)
    print(f"[1/4] generated a synthetic '{args.kind}' dataset in {data}")
    params = {"image_size": 128}
    det, model_path, _ = train_model(data, method, params, DataParams(seed=args.seed), out / f"demo-{method}.safetensors",
                                     progress=args.progress, decision=DecisionParams(time_budget=DEMO_BUDGET_S))
    if getattr(det, "selection_", None):
        from insightad.apps.auto import format_table as auto_table

        print(auto_table(det.selection_["candidates"], det.selection_["chosen"]))
    method = det.method
    rec = det.threshold_info_.get("decision")
    print(f"[2/4] trained {method} on 60 good images in {det.fit_seconds_:.1f} s -> {model_path}")
    if rec:
        from insightad.decide.decisions import DecisionRecord

        print(f"      {DecisionRecord.from_dict(rec).summary()}")
    ev = evaluate_model(det, data, DataParams(), progress=args.progress)
    print("[3/4] evaluated on the test images:")
    print(format_table(ev.metrics))
    sheet = write_examples(ev, out / "examples", det=det)
    print(f"[4/4] example images written to {sheet}")
    elapsed = time.perf_counter() - t0
    if args.json:
        print_json({**ev.metrics, "wall_seconds": elapsed, "model": str(model_path)})
    print(f"demo finished in {elapsed:.0f} s: image AUROC {ev.metrics['image_auroc']:.3f} with {method}")
    return 0
