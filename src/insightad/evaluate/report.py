"""``insightad evaluate --report DIR``: metrics JSON, curves, histograms, the per-defect table and plot,
balanced/unbalanced resampled reports, pixel metrics for map methods, and the worst mistakes.

Files written into DIR (each atomically):

- ``metrics.json``: everything below as numbers; ``report.md``: the same for people, with the figures;
- ``roc_curve.png``, ``pr_curve.png``, ``score_histogram.png`` (threshold marked);
- ``per_defect.csv``, ``per_defect.md``, ``per_defect_scores.png``: count, mean, std, min, max of the
  score and the detection rate at the threshold for each defect type (for ``good``: the false-alarm rate);
- ``balanced_unbalanced.png``: AUC, accuracy, precision, recall, F1 as mean ± std over seeded draws;
  balanced = as many normal as defective images, unbalanced = every normal plus defectives sampled
  to the prevalence asked;
- ``worst_cases.png``: the highest-scoring normal images and lowest-scoring defective images as
  overlays (heatmap and outline for map methods; ground-truth mask in magenta when known).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from insightad.config import check_resampling
from insightad.data.images import load_mask
from insightad.errors import InsightADError
from insightad.evaluate import plots
from insightad.evaluate.metrics import image_metrics, pixel_coverage, undefined_text
from insightad.io import atomic_write, csv_text, folder_lock, fsync_dir, printable

RESAMPLED_METRICS = ("auc", "accuracy", "precision", "recall", "f1")
# Figures a report writes only when its images allow (both classes): one left by an earlier report into the same
# folder would stand beside this report's files as if it were this data's
OPTIONAL_FIGURES = ("roc_curve.png", "pr_curve.png", "balanced_unbalanced.png")


# ------------------------------------------------------------------------------------ numbers
def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The resampled report's figures, taken from the one metrics function (``image_metrics``)."""
    m = image_metrics(labels, scores, threshold)
    return {"auc": m["image_auroc"], **{k: m[k] for k in ("accuracy", "precision", "recall", "f1")}}


def resampled_report(labels: np.ndarray, scores: np.ndarray, threshold: float, kind: str,
                     prevalence: float = 0.05, draws: int = 10, seed: int = 0) -> dict[str, Any]:
    """The first seed's balanced / unbalanced reports: metrics averaged over ``draws`` seeded samples.

    balanced: min(#normal, #defective) of each class. unbalanced: every normal image plus
    round(prevalence / (1 - prevalence) * #normal) defective ones (at least 1, at most all).
    """
    y = np.asarray(labels, bool)
    normal, defect = np.flatnonzero(~y), np.flatnonzero(y)
    if normal.size == 0 or defect.size == 0:
        return {"available": False, "reason": "needs both normal and defective images"}
    if kind == "balanced":
        n_norm = n_def = min(normal.size, defect.size)
    elif kind == "unbalanced":
        n_norm = normal.size
        n_def = int(min(defect.size, max(1, round(prevalence / (1 - prevalence) * normal.size))))
    else:
        raise ValueError(kind)
    rows = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d, 0 if kind == "balanced" else 1])
        idx = np.concatenate([rng.choice(normal, n_norm, replace=False), rng.choice(defect, n_def, replace=False)])
        rows.append(threshold_metrics(y[idx], scores[idx], threshold))
    # precision (and so F1) is undefined in a draw where no image is called anomalous: averaged over the
    # draws where it is defined, and how many were not is said
    defined = {k: [r[k] for r in rows if r[k] is not None] for k in RESAMPLED_METRICS}
    out: dict[str, Any] = {"available": True, "n_normal": int(n_norm), "n_anomalous": int(n_def),
                           "prevalence": n_def / (n_norm + n_def), "draws": draws, "seed": seed,
                           "mean": {k: float(np.mean(v)) if v else None for k, v in defined.items()},
                           "std": {k: float(np.std(v)) if v else None for k, v in defined.items()}}
    undefined = {k: draws - len(v) for k, v in defined.items() if len(v) < draws}
    if undefined:
        out["undefined_draws"] = undefined
    if kind == "unbalanced":
        out["prevalence_asked"] = prevalence
        wanted = prevalence / (1 - prevalence) * normal.size
        if n_def == defect.size and n_def < wanted:
            out["note"] = (f"only {defect.size} defective images: prevalence {out['prevalence']:.3f} instead of "
                           f"{prevalence:g}")
        elif wanted < 0.5:
            out["note"] = (f"{normal.size} normal images are too few for prevalence {prevalence:g}: one defective "
                           f"image gives {out['prevalence']:.3f}")
    return out


def per_defect_rows(defects: list[str], scores: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Per defect type ('good' first): count, mean, std (sample), min, max, share scored above threshold."""
    names = sorted(set(defects), key=lambda d: (d != "good", d))
    arr = np.asarray(defects)
    rows = []
    for n in names:
        s = scores[arr == n]
        rows.append({"defect": n, "count": int(s.size), "mean": float(s.mean()),
                     "std": float(s.std(ddof=1)) if s.size > 1 else 0.0, "min": float(s.min()),
                     "max": float(s.max()), "detection_rate": float((s > threshold).mean())})
    return rows


def per_defect_csv(rows: list[dict[str, Any]]) -> str:
    """The per-defect table as CSV; a defect name is a folder name, so it goes through ``io.csv_text``'s guard."""
    return csv_text(list(rows[0]), ({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                                    for r in rows))


def per_defect_markdown(rows: list[dict[str, Any]], threshold: float) -> str:
    lines = ["| defect type | count | mean score | std | min | max | detection rate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['defect']} | {r['count']} | {r['mean']:.4g} | {r['std']:.4g} | {r['min']:.4g} | "
                     f"{r['max']:.4g} | {r['detection_rate']:.1%} |")
    lines.append("")
    lines.append(f"Detection rate = share of the images scored above the threshold ({threshold:.4g}); for "
                 "`good` it is the false-alarm rate.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ report
def _write_text(path: Path, text: str) -> Path:
    """A UTF-8 report file; a file or folder name that is not UTF-8 appears in it with ``\\xNN`` escapes."""
    text = printable(text)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _short(path: Path) -> str:
    """The last two parts of a path, as a figure can draw them (a name that is not UTF-8: ``\\xNN`` escapes)."""
    return printable("/".join(Path(path).parts[-2:]))


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def calibration_overlap(det, samples) -> int:
    """How many of these images the model's threshold was calibrated on (0 when unknown)."""
    info = getattr(det, "threshold_info_", {}) or {}
    if not info.get("images") or not info.get("data"):
        return 0
    root = Path(info["data"])
    used = {(root / r).resolve() for r in info["images"]}
    return sum(Path(s.path).resolve() in used for s in samples)


SHEET_CONVENTION = "frame: green = right, red = wrong; the label says the verdict"


def worst_cases(det, ev, out: Path, per_row: int = 4) -> Path:
    """Top row: normal images with the highest scores; bottom row: defective ones with the lowest."""
    from insightad.data.images import load_image
    from insightad.render.colormap import MapScale
    from insightad.render.overlay import render_overlay

    labels = np.array([s.label for s in ev.samples], bool)
    scores, thr = ev.prediction.scores, ev.prediction.threshold
    normals = [i for i in np.argsort(-scores) if not labels[i]][:per_row]
    defects = [i for i in np.argsort(scores) if labels[i]][:per_row]
    chosen = normals + defects
    pred = det.predict([ev.samples[i].path for i in chosen], maps=det.has_maps, threshold=thr)
    scale = MapScale.for_detector(det, thr) if det.has_maps else None
    tiles = []
    drawn_masks = False
    for j, i in enumerate(chosen):
        s = ev.samples[i]
        image = load_image(s.path, 3)
        truth = load_mask(s.mask, image.size, s.path) if s.mask is not None else None
        rendered = render_overlay(image, float(pred.scores[j]), thr,
                                  anomaly_map=pred.maps[j] if pred.maps is not None else None, scale=scale,
                                  score_normalized=float(pred.scores_normalized[j]), truth_mask=truth,
                                  correct=bool(pred.scores[j] > thr) == bool(labels[i]))
        drawn_masks = drawn_masks or truth is not None
        wrong = bool(scores[i] > thr) != bool(labels[i])
        kind = ("FALSE POSITIVE" if labels[i] == 0 else "FALSE NEGATIVE") if wrong else \
            ("closest normal (correct)" if labels[i] == 0 else "closest defect (correct)")
        tiles.append((np.asarray(rendered), f"{kind}\n{_short(s.path)}", "#333333"))
    n_fp = int(((scores > thr) & ~labels).sum())
    n_fn = int(((scores <= thr) & labels).sum())
    legend = SHEET_CONVENTION + ("; white outline: predicted defect (map above the pixel threshold)"
                                 if det.has_maps else "; image-level method: score and verdict only")
    if drawn_masks:  # only mention what is drawn
        legend += "; magenta outline: ground-truth mask"
    title = (f"{det.method}: highest-scoring normal images (top) and lowest-scoring defective images (bottom)\n"
             f"{_count(n_fp, 'false positive')} and {_count(n_fn, 'false negative')} in all at threshold {thr:.4g}")
    return plots.image_sheet(tiles, out / "worst_cases.png", title, cols=max(len(normals), len(defects), 1),
                             footer=legend)


STAGE_PREFIX = ".report-"  # the hidden folder a report is made in, inside --report


def write_report(det, ev, out_dir: str | Path, *, prevalence: float = 0.05, draws: int = 10, seed: int = 0,
                 model_path: str | None = None, data: str | None = None, held: bool = False) -> dict[str, Any]:
    """Write every report file into ``out_dir``; returns what ``metrics.json`` holds.

    The files are made in a hidden folder inside ``out_dir`` and moved into place together at the end: an
    interrupted or failed run leaves the earlier report as it was, never half of a new one beside it. The folder
    is locked meanwhile (:func:`report_folder`; ``held``: the caller holds it already, from before its work)."""
    check_resampling(prevalence, draws)
    out = Path(out_dir)
    if held:
        return _staged_report(det, ev, out, prevalence, draws, seed, model_path, data)
    with report_folder(out):
        return _staged_report(det, ev, out, prevalence, draws, seed, model_path, data)


@contextlib.contextmanager
def report_folder(out_dir: str | Path) -> Iterator[Path]:
    """Hold the lock of the report folder ``out_dir`` (made if missing): two runs moving their files in at once
    would leave a report made of both, so a second is refused at once. Staging folders a killed run left go."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InsightADError(f"{out}: --report expects a folder, and this is a file")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "insightad evaluate", "--report"):
        remove_stages(out)
        yield out


def remove_stages(out: Path) -> None:
    """Remove the staging folders (``.report-*``) that runs killed before their end left in ``out``. Called
    with the folder's lock held: no live run is writing one."""
    for stage in out.glob(f"{STAGE_PREFIX}*"):
        if stage.is_dir() and not stage.is_symlink():
            shutil.rmtree(stage, ignore_errors=True)


def _staged_report(det, ev, out: Path, prevalence: float, draws: int, seed: int, model_path: str | None,
                   data: str | None) -> dict[str, Any]:
    """The report written into a staging folder inside ``out``, its files then renamed into ``out``."""
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))  # inside: the same file system, so moves are renames
    try:
        report = _write_files(det, ev, stage, prevalence, draws, seed, model_path, data)
        for name in report["files"].values():
            os.replace(stage / name, out / name)
        for stale in set(OPTIONAL_FIGURES) - set(report["files"].values()):  # an earlier report's, of other images
            (out / stale).unlink(missing_ok=True)
        fsync_dir(out)
    except OSError as e:  # a full disk: name the report's file, not the hidden folder it was made in
        if isinstance(e.filename, str) and Path(e.filename).parent in (stage, stage.resolve()):
            e.filename = str(out / Path(e.filename).name)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _write_files(det, ev, out: Path, prevalence: float, draws: int, seed: int, model_path: str | None,
                 data: str | None) -> dict[str, Any]:
    """Every report file, written into ``out``; returns what ``metrics.json`` holds."""
    labels = np.array([s.label for s in ev.samples], bool)
    scores, thr = ev.prediction.scores, float(ev.prediction.threshold)
    m = ev.metrics
    strategy = m.get("threshold_strategy", "model")
    thr_label = f"threshold {thr:.4g} ({strategy})"
    overlap = calibration_overlap(det, ev.samples) if strategy != "override" else 0
    note = (f"threshold chosen on {overlap} of these {len(labels)} images: threshold-dependent figures are optimistic"
            if overlap else None)
    name = printable(f"{det.method} on {Path(data).name if data else 'data'}")  # in figure titles
    files: dict[str, str] = {}
    both = labels.any() and (~labels).any()
    if both:
        files["roc_curve"] = plots.roc_curve(labels, scores, thr, out / "roc_curve.png", f"ROC curve: {name}", note).name
        files["pr_curve"] = plots.pr_curve(labels, scores, thr, out / "pr_curve.png",
                                           f"Precision-recall curve: {name}", note).name
    files["score_histogram"] = plots.score_histogram(labels, scores, thr, out / "score_histogram.png",
                                                     f"Anomaly scores, normal vs defective: {name}", thr_label,
                                                     note).name
    rows = per_defect_rows([s.defect for s in ev.samples], scores, thr)
    files["per_defect_csv"] = _write_text(out / "per_defect.csv", per_defect_csv(rows)).name
    files["per_defect_md"] = _write_text(out / "per_defect.md", per_defect_markdown(rows, thr)).name
    groups = {printable(r["defect"]): scores[np.asarray([s.defect for s in ev.samples]) == r["defect"]] for r in rows}
    files["per_defect_scores"] = plots.defect_distributions(groups, thr, out / "per_defect_scores.png",
                                                            f"Scores per defect type: {name}", thr_label).name
    balanced = resampled_report(labels, scores, thr, "balanced", prevalence, draws, seed)
    unbalanced = resampled_report(labels, scores, thr, "unbalanced", prevalence, draws, seed)
    if balanced["available"]:
        def bar(r: dict[str, Any]) -> dict[str, tuple[float, float]]:  # NaN: no bar where a metric is undefined
            return {k: (np.nan, np.nan) if r["mean"][k] is None else (r["mean"][k], r["std"][k])
                    for k in RESAMPLED_METRICS}

        bars = {f"balanced ({balanced['n_normal']}+{balanced['n_anomalous']})": bar(balanced),
                f"unbalanced ({unbalanced['n_normal']}+{unbalanced['n_anomalous']}, prevalence "
                f"{unbalanced['prevalence']:.3f})": bar(unbalanced)}
        files["balanced_unbalanced"] = plots.bar_with_error(
            bars, out / "balanced_unbalanced.png",
            f"Balanced vs unbalanced test sets: {name}\n(mean ± std over {draws} seeded draws, {thr_label})",
            ylabel="metric value").name
    files["worst_cases"] = worst_cases(det, ev, out).name
    pixel = {k: m[k] for k in ("pixel_auroc", "aupro") if m.get(k) is not None}
    if not pixel and m.get("pixel_undefined"):
        pixel = {"available": False, "reason": m["pixel_undefined"]}
    elif not pixel:
        has_masks = any(s.mask is not None for s in ev.samples)
        pixel = {"available": False, "reason": ("image-level method: no maps" if not det.has_maps else
                                                "no ground-truth masks" if not has_masks else "not computed")}
    report = {"method": det.method, "model": model_path, "data": data, "threshold":
              {"value": thr, "strategy": strategy, "calibrated_on_these_images": overlap},
              "metrics": m, "balanced": balanced, "unbalanced": unbalanced, "per_defect": rows, "pixel": pixel,
              "files": files}
    files["metrics"] = "metrics.json"
    files["report"] = "report.md"
    _write_text(out / "metrics.json", json.dumps(report, indent=2, default=float) + "\n")
    _write_text(out / "report.md", report_markdown(report, rows, thr))
    return report


def mean_std_text(r: dict[str, Any], k: str) -> str:
    """A resampled report's metric as mean ± std, saying over how many draws it was defined."""
    if r["mean"][k] is None:
        return "n/a"
    missing = r.get("undefined_draws", {}).get(k, 0)
    note = f" ({r['draws'] - missing} of {r['draws']} draws)" if missing else ""
    return f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}{note}"


def report_markdown(report: dict[str, Any], rows: list[dict[str, Any]], thr: float) -> str:
    """The human-readable summary: tables plus the figures."""
    m, f = report["metrics"], report["files"]
    t = report["threshold"]
    out = [f"# Evaluation: {report['method']}", "",
           f"- model: `{report['model']}`", f"- data: `{report['data']}`",
           f"- images: {m['n_normal']} normal, {m['n_anomalous']} defective",
           f"- threshold: {thr:.6g} ({t['strategy']})"]
    if t["calibrated_on_these_images"]:
        out.append(f"- **note**: the threshold was chosen on {t['calibrated_on_these_images']} of these images, so "
                   "accuracy, precision, recall and F1 are optimistic")
    out += ["", "## Image level", "", "| metric | value |", "| --- | ---: |"]
    for k in ("image_auroc", "average_precision", "accuracy", "precision", "recall", "f1", "f1_max",
              "threshold_f1_max", "false_alarm_rate"):
        if m.get(k) is not None:
            out.append(f"| {k} | {m[k]:.4f} |")
        elif k in ("image_auroc", "average_precision", "precision", "recall", "f1") and k in m:
            out.append(f"| {k} | {undefined_text(m, k)} |")
    if m.get("f1_max") is not None and m.get("f1") is not None:
        out += ["", f"F1 at the model's threshold {m['f1']:.4f} vs. {m['f1_max']:.4f} at the best threshold for "
                f"these images ({m['threshold_f1_max']:.6g}): the gap is what a better-placed threshold could gain."]
    b, u = report["balanced"], report["unbalanced"]
    if b["available"]:
        out += ["", f"## Balanced and unbalanced (mean ± std over {b['draws']} seeded draws)", "",
                "| set | normal | defective | " + " | ".join(RESAMPLED_METRICS) + " |",
                "| --- | ---: | ---: | " + " | ".join("---:" for _ in RESAMPLED_METRICS) + " |"]
        for label, r in (("balanced", b), (f"unbalanced (prevalence {u['prevalence']:.3f})", u)):
            out.append(f"| {label} | {r['n_normal']} | {r['n_anomalous']} | "
                       + " | ".join(mean_std_text(r, k) for k in RESAMPLED_METRICS) + " |")
        if u.get("note"):
            out.append(f"\n{u['note']}")
    else:
        out += ["", "## Balanced and unbalanced", "", f"- n/a ({b.get('reason', 'not computed')})"]
    out += ["", "## Per defect type", "", per_defect_markdown(rows, thr)]
    p = report["pixel"]
    out += ["## Pixel level", ""]
    out += [f"- {k}: {v:.4f}" for k, v in p.items() if isinstance(v, float)] or [f"- {p.get('reason')}"]
    if report["metrics"].get("pixel_images_skipped"):
        out.append(f"- {pixel_coverage(report['metrics'])}")
    out += ["", "## Figures", ""]
    for key in ("roc_curve", "pr_curve", "score_histogram", "per_defect_scores", "balanced_unbalanced", "worst_cases"):
        if key in f:
            out.append(f"![{key}]({f[key]})")
    return "\n".join(out) + "\n"
