"""insightad predict: score images with a model file; a table, or JSON lines with --json."""

from __future__ import annotations

import argparse
from pathlib import Path

from insightad.cli.common import add_model_flag, add_progress_flag, new_parser, parse_threshold, print_json, with_config
from insightad.data.images import is_image_file
from insightad.errors import InsightADError


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "predict", "score images (a decision and raw score per image)")
    add_model_flag(p)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--image", action="append", default=[], metavar="IMAGE", help="an image (repeatable; seed alias)")
    p.add_argument("--threshold", metavar="VALUE|FILE.json", help="override the model's threshold")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--heatmap", metavar="DIR", help="write <stem>_heatmap.png per image into DIR (map methods)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    add_progress_flag(p)
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "predict"), _argv=argv)


def expand_images(items: list[str]) -> list[Path]:
    """Files as given; folders expanded to their images (sorted). Missing paths are errors."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(q for q in path.rglob("*") if q.is_file() and is_image_file(q))
            if not found:
                raise InsightADError(f"{path}: no images found in this folder")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise InsightADError(f"{path}: no such file or folder")
    if not out:
        raise InsightADError("predict: no images given (pass IMAGE paths or --image)")
    return out


def run(args: argparse.Namespace) -> int:
    from insightad.model_file import load_model

    paths = expand_images(list(args.images) + list(args.image))
    det = load_model(args.model, device=args.device)
    thr = parse_threshold(args.threshold)
    if args.heatmap and not det.has_maps:
        raise InsightADError(f"--heatmap: {det.method} models give no anomaly maps (train padim or patchcore)")
    pred = det.predict(paths, maps=bool(args.heatmap), progress=args.progress, threshold=thr)
    heatmaps = [None] * len(paths)
    if args.heatmap:
        from insightad.apps.heatmap import write_heatmaps

        heatmaps = write_heatmaps(paths, pred.maps, pred.threshold, args.heatmap)
    if args.json:
        for path, s, lab, hm in zip(paths, pred.scores, pred.labels, heatmaps):
            print_json({"path": str(path), "score": float(s), "threshold": pred.threshold,
                        "anomalous": bool(lab), "method": det.method, **({"heatmap": str(hm)} if hm else {})})
        return 0
    width = max(len(str(p)) for p in paths)
    print(f"{'image':<{width}}  {'score':>12}  verdict   (threshold {pred.threshold:.6g})")
    for path, s, lab in zip(paths, pred.scores, pred.labels):
        print(f"{str(path):<{width}}  {s:>12.6g}  {'ANOMALOUS' if lab else 'normal'}")
    if args.heatmap:
        print(f"{sum(h is not None for h in heatmaps)} heatmaps written to {args.heatmap}")
    return 0
