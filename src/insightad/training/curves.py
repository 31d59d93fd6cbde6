"""Training curves as PNG: one value per epoch, training and validation, best epoch marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curve(history: Sequence[dict[str, Any]], metric: str, path: Path, title: str,
               best_epoch: int | None = None, chance: float | None = None) -> Path | None:
    """Plot ``train_<metric>`` and ``val_<metric>`` per epoch; None when the history has neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from insightad.io import atomic_write

    series = {f"{split} {metric}": [(h["epoch"], h[f"{split}_{metric}"]) for h in history
                                     if h.get(f"{split}_{metric}") is not None]
              for split in ("train", "val")}
    series = {"training" if k.startswith("train") else "validation (held-out)": v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    values = [y for points in series.values() for _, y in points]
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, label=label)
    if min(values) > 0 and max(values) / min(values) > 100:  # a loss falling by decades: show them all
        ax.set_yscale("log")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
    if chance is not None:
        ax.axhline(chance, color="red", linestyle="--", linewidth=0.8, label=f"chance ({chance:g})")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
