"""Report figures: ROC and precision-recall curves, score histograms, per-defect score distributions.

Every figure is titled, has labelled axes and a legend, marks the threshold or operating point,
and is written atomically as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

NORMAL_COLOUR = "#2a9d4b"
DEFECT_COLOUR = "#d1342f"
THRESHOLD_COLOUR = "#222222"
DPI = 120

plt.rcParams.update({"axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "xtick.labelsize": 9,
                     "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False})


def save(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically and close it."""
    from insightad.io import atomic_write

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    plt.close(fig)
    return path


def _subtitle(fig: plt.Figure, text: str | None) -> None:
    if text:
        fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=8, color="#555555")


def roc_curve(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str,
              note: str | None = None) -> Path:
    """ROC curve with its AUROC, chance diagonal, and the operating point at the threshold."""
    y = np.asarray(labels, bool)
    fpr, tpr, _ = skm.roc_curve(y, scores)
    auc = skm.roc_auc_score(y, scores)
    pred = scores > threshold
    op = (pred[~y].mean(), pred[y].mean())
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.plot(fpr, tpr, color=DEFECT_COLOUR, lw=2, label=f"ROC (AUROC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
    ax.scatter(*op, s=70, color=THRESHOLD_COLOUR, zorder=5,
               label=f"threshold {threshold:.4g}: TPR {op[1]:.3f}, FPR {op[0]:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="false positive rate (normal images flagged)",
           ylabel="true positive rate (defects caught)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _subtitle(fig, note)
    return save(fig, path)


def pr_curve(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str,
             note: str | None = None) -> Path:
    """Precision-recall curve with average precision, the prevalence baseline, and the operating point."""
    y = np.asarray(labels, bool)
    prec, rec, _ = skm.precision_recall_curve(y, scores)
    ap = skm.average_precision_score(y, scores)
    pred = scores > threshold
    op_p = (pred & y).sum() / max(pred.sum(), 1)
    op_r = (pred & y).sum() / y.sum()
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.step(rec, prec, where="post", color=DEFECT_COLOUR, lw=2, label=f"precision-recall (AP = {ap:.4f})")
    ax.axhline(y.mean(), ls="--", color="#999999", lw=1, label=f"chance (prevalence {y.mean():.3f})")
    ax.scatter(op_r, op_p, s=70, color=THRESHOLD_COLOUR, zorder=5,
               label=f"threshold {threshold:.4g}: precision {op_p:.3f}, recall {op_r:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="recall (defects caught)",
           ylabel="precision (flagged images that are defective)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    _subtitle(fig, note)
    return save(fig, path)


def _bins(scores: np.ndarray, threshold: float, n: int = 40) -> np.ndarray:
    lo, hi = float(min(scores.min(), threshold)), float(max(scores.max(), threshold))
    pad = 0.03 * (hi - lo or 1.0)
    return np.linspace(lo - pad, hi + pad, n + 1)


def score_histogram(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str,
                    threshold_label: str, note: str | None = None) -> Path:
    """Histograms of normal and defective scores on shared bins, with the threshold line."""
    y = np.asarray(labels, bool)
    bins = _bins(scores, threshold).tolist()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # filled bars for the share, a solid outline on top so neither class hides the other where they overlap
    for mask, colour, name in ((y, DEFECT_COLOUR, "defective"), (~y, NORMAL_COLOUR, "normal")):
        if mask.any():
            ax.hist(scores[mask], bins=bins, color=colour, alpha=0.35)
            ax.hist(scores[mask], bins=bins, histtype="step", color=colour, linewidth=1.8,
                    label=f"{name} (n = {mask.sum()})")
    ax.axvline(threshold, color=THRESHOLD_COLOUR, ls="--", lw=1.8, label=threshold_label)
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="number of images", title=title)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper right")
    _subtitle(fig, note)
    return save(fig, path)


def defect_distributions(groups: dict[str, np.ndarray], threshold: float, path: Path, title: str,
                         threshold_label: str) -> Path:
    """One row per defect type: box plot plus every image as a dot, the threshold line, and the share
    of each type flagged anomalous written at the right."""
    names = list(groups)
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(8.5, 1.9 + 0.62 * len(names)))
    data = [groups[n] for n in names]
    pos = np.arange(len(names))[::-1]
    bp = ax.boxplot(data, positions=pos, orientation="horizontal", widths=0.55, showfliers=False,
                    patch_artist=True, medianprops={"color": "black"})
    for patch, n in zip(bp["boxes"], names):
        patch.set(facecolor=NORMAL_COLOUR if n == "good" else DEFECT_COLOUR, alpha=0.25)
    for p, n in zip(pos, names):
        s = groups[n]
        ax.scatter(s, p + rng.uniform(-0.18, 0.18, s.size), s=14, alpha=0.8, zorder=3,
                   color=NORMAL_COLOUR if n == "good" else DEFECT_COLOUR)
    ax.axvline(threshold, color=THRESHOLD_COLOUR, ls="--", lw=1.8, label=threshold_label)
    ax.set_yticks(pos, [f"{n} ({groups[n].size})" for n in names])
    for p, n in zip(pos, names):
        rate = float((groups[n] > threshold).mean())
        what = "flagged\n(false alarms)" if n == "good" else "detected"
        ax.annotate(f"{rate:.0%} {what}", xy=(1.01, p), xycoords=("axes fraction", "data"), va="center",
                    fontsize=8.5, color="#333333")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="defect type (images)", title=title)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.2 / len(names)), fontsize=8.5, frameon=False)
    return save(fig, path)


def image_sheet(tiles: list[tuple[np.ndarray, str, str]], path: Path, title: str, cols: int = 4,
                footer: str | None = None) -> Path:
    """A grid of rendered images, each with a caption in a given colour."""
    rows = max(1, (len(tiles) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.9 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption, colour) in zip(axes.flat, tiles):
        ax.imshow(img)
        ax.set_title(caption, fontsize=8.5, color=colour)
    fig.suptitle(title, fontsize=12)
    if footer:
        fig.supxlabel(footer, fontsize=8.5, color="#555555")
    return save(fig, path)


def bar_with_error(rows: dict[str, dict[str, tuple[float, float]]], path: Path, title: str,
                   ylabel: str = "value") -> Path:
    """Grouped bars (one group per metric, one bar per setting) with ± std error bars."""
    settings = list(rows)
    metrics = list(next(iter(rows.values())))
    x = np.arange(len(metrics))
    w = 0.8 / len(settings)
    colours = ["#3b6fb6", "#e08a2c", "#6b4fa3"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, s in enumerate(settings):
        means = [rows[s][m][0] for m in metrics]
        stds = [rows[s][m][1] for m in metrics]
        bars = ax.bar(x + (i - (len(settings) - 1) / 2) * w, means, w, yerr=stds, capsize=3, label=s,
                      color=colours[i % len(colours)], alpha=0.85)
        for b, v, sd in zip(bars, means, stds):
            ax.text(b.get_x() + b.get_width() / 2, 0.03, f"{v:.3f}\n±{sd:.3f}", ha="center", va="bottom",
                    fontsize=7.5, color="white", fontweight="bold")
    ax.set_xticks(x, metrics)
    ax.set(ylim=(0, 1.08), ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(settings), frameon=False)
    return save(fig, path)


