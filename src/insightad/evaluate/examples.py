"""A contact sheet of scored test images: what the model calls normal and anomalous, at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from insightad.data.images import load_image
from insightad.render.colormap import MapScale, blend, default_scale

RIGHT, WRONG = "#28aa46", "#dc2828"  # the same green and red as the report's worst-cases sheet


def _pick(scores: np.ndarray, labels: np.ndarray, n: int) -> list[int]:
    """The most anomalous defective images and the most normal good ones, interleaved."""
    order = np.argsort(-scores)
    bad = [i for i in order if labels[i]][: n // 2]
    good = [i for i in order[::-1] if not labels[i]][: n - len(bad)]
    return bad + good


def write_examples(ev, out_dir: str | Path, n: int = 8, det=None) -> Path:
    """Write ``examples.png`` (images titled with score and verdict, heatmaps blended where present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from insightad.io import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([s.label for s in ev.samples], dtype=bool)
    pred = ev.prediction
    scale = (MapScale.for_detector(det, pred.threshold) if det is not None
             else MapScale(pred.threshold, default_scale(pred.threshold)))
    idx = _pick(pred.scores, labels, min(n, len(labels)))
    cols = 4
    rows = max(1, (len(idx) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        img = np.asarray(load_image(ev.samples[i].path, 3))
        if pred.maps is not None and pred.maps[i] is not None:  # the one colour convention, map at image size
            m = np.asarray(Image.fromarray(pred.maps[i].astype(np.float32), mode="F").resize(
                (img.shape[1], img.shape[0]), Image.Resampling.BILINEAR))
            img = blend(img, m, scale)
        ax.imshow(img)
        verdict = "ANOMALOUS" if pred.labels[i] else "normal"
        truth = ev.samples[i].defect
        frame = RIGHT if bool(pred.labels[i]) == bool(labels[i]) else WRONG
        for spine in ax.spines.values():  # the frame says right or wrong; the label says the verdict
            spine.set_edgecolor(frame)
            spine.set_linewidth(4)
        ax.set_title(f"{truth}: {verdict}\nscore {pred.scores[i]:.3g} (thr {pred.threshold:.3g})", fontsize=9,
                     color="#333333")
    fig.suptitle(f"{ev.metrics['method']}: most anomalous defects and most normal good images\n"
                 "frame: green = right, red = wrong; the label says the verdict", fontsize=10)
    fig.tight_layout()
    path = out_dir / "examples.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path
