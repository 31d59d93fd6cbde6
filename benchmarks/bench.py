#!/usr/bin/env python
"""Train, evaluate and time detectors on one dataset; one JSON line per run, then a comparison table.

    python benchmarks/bench.py --data ../shared/data/mvtec_ad/bottle --methods padim patchcore \\
        --coreset 0.1 0.01 --seeds 0 1 2

Every run is a fresh Python process, so its peak RSS is its own. Each JSON line has ``method,
backbone, engine, image_size, coreset, image_auroc, pixel_auroc, aupro, f1, fit_s, predict_ips,
backbone_ips, peak_rss_mb`` and a few more keys:

- ``fit_s``: ``Detector.fit`` wall time (decoding, features, statistics/coreset, default threshold);
  imports and writing the model file are reported apart (``import_s``, ``train_total_s``).
- ``predict_ips``: images per second of ``Detector.predict`` on the test images (scores and
  decisions, as ``insightad predict`` does), decoding included, model warm (after evaluation has
  run once); ``predict_maps_ips``: the same with every map brought to its image's full resolution.
- ``backbone_ips``: the feature extractor alone (the layers the method uses) on random uint8
  images at the same batch size and image size, same engine: the ceiling for ``predict_ips``.
- ``peak_rss_mb``: peak resident memory of the run's main process (``peak_rss_workers_mb``: the
  largest image-decoding worker).
- ``pixel_auroc``/``aupro``: compared at 256 px (``insightad.evaluate.pixel``).

JSON lines go to stdout (or ``--out``); the table goes to stderr.

``--suite`` runs every method (or ``--methods``) on every dataset found under ``--root`` (default
../shared/data: MVTec categories and crack-style sets) with each method's defaults, over ``--seeds``,
and prints one table: image AUROC mean and spread (sample standard deviation) over seeds, pixel
AUROC, AUPRO, f1_max, fit seconds, predict images/s, model file size, peak RSS. Its JSON lines go to
benchmarks/results/suite.jsonl (``--out``); ``--markdown`` writes the table to docs/benchmarks.md
(its hand-written ``## `` sections after the table are kept).
``--from FILE`` builds the table from JSON lines already measured (e.g. the trained methods' runs
made elsewhere, appended to the same file) without running anything.

    nice -n 10 python benchmarks/bench.py --suite --methods baseline padim patchcore --seeds 0 1 2 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("torch", "onnx")
KEYS = ("method", "backbone", "engine", "image_size", "coreset", "image_auroc", "pixel_auroc", "aupro", "f1",
        "fit_s", "predict_ips", "backbone_ips", "peak_rss_mb")


# ----------------------------------------------------------------------------------- one run
def run_one(spec: dict) -> dict:
    """Runs inside the fresh worker process."""
    import resource

    t0 = time.perf_counter()
    import torch

    from insightad.apps.train import train_model
    from insightad.config import DataParams
    from insightad.evaluate.run import evaluate_model
    from insightad.methods import get_method

    import_s = time.perf_counter() - t0
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    method = spec["method"]
    if spec.get("defaults"):  # --suite: the method's own defaults, only the seed and the device set
        params = {"seed": spec["seed"], "device": "cpu"}
    else:
        params = {"backbone": spec["backbone"], "image_size": spec["image_size"], "batch_size": spec["batch_size"],
                  "seed": spec["seed"], "device": "cpu"}
    if method == "patchcore" and spec["coreset"] is not None:
        params["coreset_ratio"] = spec["coreset"]
    fields = set(get_method(method).Params.__dataclass_fields__)
    if "fit_engine" in fields:  # the frozen backbone of fit runs on the engine under test too
        params["fit_engine"] = spec["engine"]
    params.update({k: v for k, v in spec["set"].items() if k in fields})
    dp = DataParams(seed=spec["seed"])
    t = time.perf_counter()
    det, _, split = train_model(spec["data"], method, params, dp, spec["model_path"], progress=False)
    train_total = time.perf_counter() - t
    from insightad.inference.load import load_for_inference

    fit_seconds = det.fit_seconds_
    model_mb = os.path.getsize(spec["model_path"]) / 2**20
    defaults = det.get_params()
    det = load_for_inference(spec["model_path"], spec["engine"], spec["threads"] or None)
    det.predict(paths_warm(spec["data"]), maps=True)  # warm: the engine's first call (and any export) is not timed
    t = time.perf_counter()
    ev = evaluate_model(det, spec["data"], dp, progress=False)
    eval_s = time.perf_counter() - t
    paths = [s.path for s in ev.samples]
    m = ev.metrics
    del ev  # its maps (every test image at full size) would otherwise count twice in the peak RSS
    t = time.perf_counter()
    det.predict(paths, maps=False)  # what 'insightad predict' does: scores and decisions
    predict_ips = len(paths) / (time.perf_counter() - t)
    t = time.perf_counter()
    det.predict(paths, maps=True)  # plus every map brought back to its image's full resolution
    predict_maps_ips = len(paths) / (time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the backbone-alone timing
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    backbone_ips = time_backbone(det, defaults.get("batch_size", spec["batch_size"]),
                                 defaults.get("image_size", spec["image_size"]), spec["engine"])
    out = {"method": method, "backbone": defaults.get("backbone", spec["backbone"]), "engine": spec["engine"],
           "image_size": defaults.get("image_size", spec["image_size"]),
           "coreset": defaults.get("coreset_ratio") if method == "patchcore" else None,
           "f1_max": m.get("f1_max"), "model_mb": round(model_mb, 1), "dataset": Path(spec["data"]).name,
           "image_auroc": m.get("image_auroc"), "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro"),
           "f1": m.get("f1"), "fit_s": round(fit_seconds, 2), "predict_ips": round(predict_ips, 2),
           "predict_maps_ips": round(predict_maps_ips, 2),
           "backbone_ips": round(backbone_ips, 2) if backbone_ips else None, "peak_rss_mb": round(rss, 1),
           "seed": spec["seed"], "batch_size": spec["batch_size"], "threads": torch.get_num_threads(),
           "data": str(spec["data"]), "n_train": len(split["train"]), "n_test": len(paths),
           "pixel_ap": m.get("pixel_ap"), "pixel_resolution": m.get("pixel_resolution"),
           "threshold": det.threshold_, "threshold_strategy": det.threshold_strategy_,
           "import_s": round(import_s, 2), "train_total_s": round(train_total, 2), "eval_s": round(eval_s, 2),
           "peak_rss_workers_mb": round(rss_children, 1), "params": {k: v for k, v in defaults.items()
                                                                      if k in spec["set"] or spec.get("defaults")}}
    if method == "patchcore":
        out["bank_size"] = int(det.metadata_["state"]["bank_size"])
    return out


def paths_warm(data: str) -> list:
    from insightad.data import discover

    return [s.path for s in discover(data).samples[:2]]


def time_backbone(det, batch_size: int, image_size: int, engine: str, min_seconds: float = 3.0) -> float | None:
    """Images/s of the model's normalisation + feature extractor alone, warm, on the same engine."""
    import torch

    from insightad.engines.features import feature_runner
    from insightad.model_file import load_model

    model = det.model_ if det.model_ is not None else load_model(det.model_path_).model_
    model = getattr(model, "inner", model)  # a tiled model's own
    if not hasattr(model, "extractor"):
        return None

    run, _ = feature_runner(model.normalize, model.extractor, (3, image_size, image_size), engine)
    x = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    for _ in range(2):
        run(x)
    n, t = 0, time.perf_counter()
    while n < 4 or time.perf_counter() - t < min_seconds:
        run(x)
        n += 1
    return n * batch_size / (time.perf_counter() - t)


# ----------------------------------------------------------------------------------- driver
def runs(args: argparse.Namespace) -> list[dict]:
    out = []
    for method in args.methods:
        for coreset in (args.coreset if method == "patchcore" else [None]):
            for seed in args.seeds:
                out.append({"method": method, "coreset": coreset, "seed": seed, "data": str(args.data),
                            "backbone": args.backbone, "engine": args.engine, "image_size": args.image_size,
                            "batch_size": args.batch_size, "threads": args.threads, "set": args.set})
    return out


def find_datasets(root: Path) -> list[Path]:
    """Every dataset folder under ``root`` (two levels deep): MVTec categories (train/ and test/) and
    crack-style sets (Negative/ and Positive/), in name order."""
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / "train").is_dir() and (d / "test").is_dir() or (d / "Negative").is_dir():
            found.append(d)
        else:
            found.extend(c for c in sorted(d.iterdir()) if c.is_dir() and (
                (c / "train").is_dir() and (c / "test").is_dir() or (c / "Negative").is_dir()))
    return found


def suite_runs(args: argparse.Namespace) -> list[dict]:
    from insightad.methods import list_methods

    methods = args.methods or list_methods()
    return [{"method": m, "coreset": None, "seed": seed, "data": str(d), "backbone": args.backbone,
             "engine": args.engine, "image_size": args.image_size, "batch_size": args.batch_size,
             "threads": args.threads, "set": {}, "defaults": True}
            for d in find_datasets(args.root) for m in methods for seed in args.seeds]


SUITE_COLS = (("image_auroc", "image AUROC", 3), ("pixel_auroc", "pixel AUROC", 3), ("aupro", "AUPRO", 3),
              ("f1_max", "f1_max", 3), ("fit_s", "fit s", 1), ("predict_ips", "predict img/s", 1),
              ("model_mb", "model MB", 1), ("peak_rss_mb", "peak RSS MB", 0))


def suite_table(rows: list[dict], markdown: bool = False) -> str:
    """One line per (dataset, method): means over seeds; image AUROC with its spread (sample std)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("dataset") or Path(r["data"]).name, r["method"]), []).append(r)
    head = ["dataset", "method", "seeds", *(label for _, label, _ in SUITE_COLS)]
    body = []
    for (data, method), rs in sorted(groups.items()):
        cells = [data, method, str(len(rs))]
        for key, _, digits in SUITE_COLS:
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            if not vals:
                cells.append("-")
                continue
            cell = f"{statistics.fmean(vals):.{digits}f}"
            if key == "image_auroc" and len(vals) > 1:
                cell += f" ± {statistics.stdev(vals):.{digits}f}"
            cells.append(cell)
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * len(widths)), *map(fmt, body)])


def write_markdown(rows: list[dict], path: Path, machine: str) -> None:
    text = ("# Benchmarks\n\nEvery method with its defaults on every dataset under `../shared/data`, written by "
            "`python benchmarks/bench.py --suite --markdown` (JSON lines in `benchmarks/results/suite.jsonl`).\n"
            "Image AUROC: mean ± sample standard deviation over the seeds (the seed picks the crack hold-out "
            "split and the methods' own randomness; MVTec categories have a fixed split). Crack protocol: "
            "train on 80% of `Negative/`, evaluate on the held-out 20% and all of `Positive/`. Pixel metrics "
            "where the dataset has masks and the method has maps. Fit s, predict images/s (scores and "
            "decisions, decoding included, warm) and peak RSS are the PyTorch engine's on " + machine + ".\n\n"
            + suite_table(rows, markdown=True) + "\n")
    if path.is_file():  # sections written by hand after the table ("## ..." headings) are kept
        old = path.read_text(encoding="utf-8")
        at = old.find("\n## ")
        if at >= 0:
            text += old[at:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench: --set expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def table(rows: list[dict]) -> str:
    """Mean over seeds per configuration."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["coreset"], r["backbone"], r["engine"], r["image_size"]), []).append(r)
    cols = ("image_auroc", "pixel_auroc", "aupro", "f1", "fit_s", "predict_ips", "backbone_ips", "peak_rss_mb")
    head = f"{'method':<10} {'coreset':>7} {'engine':<6} {'seeds':>5} " + " ".join(f"{c:>12}" for c in cols)
    lines = [head, "-" * len(head)]
    for (method, coreset, _bb, engine, _size), rs in groups.items():
        cells = []
        for c in cols:
            vals = [r[c] for r in rs if r.get(c) is not None]
            v = statistics.fmean(vals) if vals else None
            cells.append(f"{v:>12.4f}" if v is not None and c in cols[:4] else
                         f"{v:>12.1f}" if v is not None else f"{'-':>12}")
        lines.append(f"{method:<10} {coreset if coreset is not None else '-':>7} {engine:<6} {len(rs):>5} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="dataset folder (an MVTec AD category)")
    p.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: padim patchcore; "
                   "with --suite: every method)")
    p.add_argument("--suite", action="store_true", help="every method on every dataset under --root, defaults")
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                   help="where --suite looks for datasets")
    p.add_argument("--markdown", type=Path, nargs="?", const=Path(__file__).resolve().parents[1] / "docs" /
                   "benchmarks.md", help="--suite: also write the table as Markdown (default docs/benchmarks.md)")
    p.add_argument("--from", dest="from_file", type=Path, help="--suite: table from these JSON lines, run nothing")
    p.add_argument("--machine", default="a shared 2-core CPU machine (loaded: speeds are lower bounds)",
                   help="how docs/benchmarks.md describes the machine")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--engine", default="torch", help=f"inference engine ({', '.join(ENGINES)})")
    p.add_argument("--coreset", type=float, nargs="+", default=[0.1], help="PatchCore coreset ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter (JSON value), e.g. --set n_features=100 --set 'layers=[1,2]'")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))), flush=True)
        return 0
    if args.suite:
        return run_suite(args)
    if args.methods is None:
        args.methods = ["padim", "patchcore"]
    if args.data is None:
        p.error("--data is required")
    if args.engine not in ENGINES:
        p.error(f"--engine: {args.engine!r} is not implemented yet (available: {', '.join(ENGINES)})")
    if not args.data.is_dir():
        p.error(f"--data: {args.data} is not a folder")
    args.set = parse_set(args.set)
    rows = run_all(runs(args), args.out)
    if rows is None:
        return 1
    print(table(rows), file=sys.stderr)
    return 0


def run_all(specs: list[dict], out: Path | None, keep_going: bool = False) -> list[dict] | None:
    """Each spec in a fresh worker process; its JSON line printed (and appended to ``out``). A failed run
    stops everything (None), or with ``keep_going`` is reported and skipped."""
    rows = []
    with tempfile_dir() as tmp:
        for i, spec in enumerate(specs):
            spec["model_path"] = str(Path(tmp) / f"run{i}.safetensors")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"bench: run {spec['method']} on {Path(spec['data']).name} seed {spec['seed']} failed:\n"
                      f"{proc.stderr[-3000:]}", file=sys.stderr)
                if keep_going:
                    continue
                return None
            line = proc.stdout.strip().splitlines()[-1]
            rows.append(json.loads(line))
            print(line, flush=True)
            if out:
                with out.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
            Path(spec["model_path"]).unlink(missing_ok=True)
    return rows


def run_suite(args: argparse.Namespace) -> int:
    if args.from_file:
        rows = [json.loads(line) for line in args.from_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        if not args.root.is_dir():
            print(f"bench: --root: {args.root} is not a folder", file=sys.stderr)
            return 2
        out = args.out or Path(__file__).resolve().parent / "results" / "suite.jsonl"
        rows = run_all(suite_runs(args), out, keep_going=True) or []
    print(suite_table(rows), file=sys.stderr)
    if args.markdown:
        write_markdown(rows, args.markdown, args.machine)
    return 0


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="insightad-bench-")


if __name__ == "__main__":
    sys.exit(main())
