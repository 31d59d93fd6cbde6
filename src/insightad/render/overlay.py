"""Overlays: an image with its verdict written above it and, for methods with maps, the heatmap blended
over it and the defect outlined where the map exceeds the pixel threshold.

Colours: the one convention of ``render.colormap`` (0.5 = the outline level), blended more strongly
where it is higher. The predicted defect outline is white; a ground-truth mask, when given, is outlined in magenta.
Images smaller than 320 pixels on their short side are enlarged so the verdict stays readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from insightad.data.images import load_image
from insightad.render.colormap import MapScale, blend, default_scale, font, with_colorbar
from insightad.render.names import output_names

MIN_SIDE = 320
ANOMALOUS_RGB = (220, 40, 40)
NORMAL_RGB = (40, 170, 70)
OUTLINE_RGB = (255, 255, 255)
TRUTH_RGB = (255, 0, 255)
RIGHT_RGB, WRONG_RGB = NORMAL_RGB, ANOMALOUS_RGB  # sheets with known truth: the frame says right or wrong


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels on the border of ``mask``, ``width`` pixels thick (inside the region)."""
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def _resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map (h, w) resized to PIL ``size`` (w, h), bilinear."""
    if m.shape == (size[1], size[0]):
        return m
    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))


def render_overlay(image: Image.Image, score: float, threshold: float, *, anomaly_map: np.ndarray | None = None,
                   scale: MapScale | None = None, score_normalized: float | None = None,
                   truth_mask: np.ndarray | None = None, caption: str | None = None,
                   correct: bool | None = None) -> Image.Image:
    """The overlay of one image: verdict banner on top; heatmap and outlines when a map is given.

    ``correct`` (when the truth is known, as in report sheets): the frame says right (green) or wrong (red)
    and the banner's verdict is written in white; unknown: the frame and the verdict share the verdict's colour.
    """
    img = image.convert("RGB")
    short = min(img.size)
    if short < MIN_SIDE:
        f = MIN_SIDE / short
        img = img.resize((round(img.size[0] * f), round(img.size[1] * f)), Image.Resampling.BICUBIC)
    w, h = img.size
    rgb = np.asarray(img, dtype=np.float32)
    line = max(1, round(min(w, h) / 160))
    if anomaly_map is not None:
        scale = scale or MapScale(threshold, default_scale(threshold))
        m = _resize_map(np.asarray(anomaly_map, dtype=np.float32), (w, h))
        out = blend(rgb, m, scale)
        out[_outline(m > scale.level, line)] = OUTLINE_RGB
    else:
        out = rgb.astype(np.uint8)
    if truth_mask is not None:
        t = np.asarray(Image.fromarray(truth_mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
        out[_outline(t, line)] = TRUTH_RGB
    anomalous = bool(score > threshold) if np.isfinite(score) else False
    picture = _with_banner(Image.fromarray(out), score, threshold, anomalous, score_normalized, caption, correct)
    return with_colorbar(picture, scale) if anomaly_map is not None and scale is not None else picture


def _with_banner(img: Image.Image, score: float, threshold: float, anomalous: bool, normalized: float | None,
                 caption: str | None, correct: bool | None = None) -> Image.Image:
    """A dark strip above the image: the verdict, score against threshold, and a frame: in the verdict's colour
    when the truth is unknown, else green for a right verdict and red for a wrong one (verdict then in white)."""
    w, h = img.size
    if correct is None:
        colour = verdict_colour = ANOMALOUS_RGB if anomalous else NORMAL_RGB
    else:
        colour, verdict_colour = (RIGHT_RGB if correct else WRONG_RGB), (255, 255, 255)
    verdict = "ANOMALOUS" if anomalous else "NORMAL"
    detail = f"score {score:.4g} {'>' if anomalous else '<='} threshold {threshold:.4g}"
    if normalized is not None and np.isfinite(normalized):
        detail += f"  (normalized {normalized:.2f})"
    lines = [(verdict, verdict_colour), (detail, (235, 235, 235))] + ([(caption, (200, 200, 200))] if caption else [])
    size = 40
    while size > 9:
        fnt = font(size)
        if max(ImageDraw.Draw(img).textlength(t, font=fnt) for t, _ in lines) <= 0.94 * w:
            break
        size -= 1
    fnt = font(size)
    pad = max(4, size // 3)
    banner_h = pad * 2 + len(lines) * (size + pad // 2)
    frame = max(2, round(min(w, h) / 100))
    canvas = Image.new("RGB", (w + 2 * frame, h + banner_h + 2 * frame), (25, 25, 25))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, banner_h, w + 2 * frame - 1, h + banner_h + 2 * frame - 1], fill=colour)
    canvas.paste(img, (frame, banner_h + frame))
    y = pad
    for text, c in lines:
        draw.text((frame + pad, y), text, fill=c, font=fnt)
        y += size + pad // 2
    return canvas


# ------------------------------------------------------------------------------------ files
def predict_with_overlays(det: Any, paths: Sequence[Path], out_dir: str | Path, threshold: float | None = None,
                          chunk: int = 16, progress: bool = False, strict: bool = True) -> tuple[Any, list[Path | None]]:
    """Score ``paths`` through the one prediction loop and write ``<stem>_overlay.png`` for each into
    ``out_dir``. Returns (Prediction without maps, overlay paths: None for an image in ``errors``; with
    ``strict=False`` an unreadable image is listed there and the others are still scored). Maps live for
    one chunk only."""
    from insightad.io import atomic_write
    from insightad.scoring import Prediction

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = MapScale.for_detector(det, threshold) if det.has_maps else None
    written: list[Path | None] = []
    names = output_names(paths, "overlay")
    parts = []
    for pred in det.iter_predict(list(paths), chunk=chunk, maps=det.has_maps, threshold=threshold,
                                 progress=progress, strict=strict):
        for i in range(len(pred)):
            if i in pred.errors:
                written.append(None)
                continue
            path = Path(paths[pred.offset + i])
            m = pred.maps[i] if pred.maps is not None else None
            img = render_overlay(load_image(path, 3), float(pred.scores[i]), pred.threshold, anomaly_map=m,
                                 scale=scale, score_normalized=float(pred.scores_normalized[i]))
            target = out_dir / names[pred.offset + i]
            atomic_write(target, partial(img.save, format="PNG"))
            written.append(target)
        pred.maps = None
        parts.append(pred)
    return Prediction.concat(parts), written
