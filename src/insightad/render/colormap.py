"""The one colour convention for anomaly maps: heatmap files, overlays, the server's heatmap, sheets.

A map value ``m`` is first put on the model's calibrated scale,

    v = 1 / (1 + exp(-(m - level) / scale))

(``level`` = the pixel threshold, else the image threshold; ``scale`` = the spread measured at
calibration), so 0.5 is the outline level in every image and every picture reads the same:
never a per-image min-max, which makes any normal image look hot. ``v`` then runs through the
'jet' colours (blue -> cyan -> yellow -> red). numpy and Pillow only (the runtime has no matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _jet_lut() -> np.ndarray:
    """256 x 3 uint8: the classic piecewise-linear 'jet' colours."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=1)
    return np.round(rgb * 255.0).astype(np.uint8)


LUT = _jet_lut()


def default_scale(level: float) -> float:
    """The spread used when none was measured: a quarter of the level's magnitude (1 for 0)."""
    return abs(float(level)) / 4.0 if level else 1.0


@dataclass(frozen=True)
class MapScale:
    """Where a map is outlined (``level``) and the spread that colours it (``scale``)."""

    level: float
    scale: float

    @classmethod
    def for_detector(cls, det: Any, threshold: float | None = None) -> MapScale:
        """The model's calibrated pixel level and spread (``threshold.details.pixel_threshold`` and
        ``pixel_scale``), else the image threshold in use and its spread."""
        info = getattr(det, "threshold_info_", {}) or {}
        level = info.get("pixel_threshold")
        if level is None:
            level = det.threshold_ if threshold is None else float(threshold)
        scale = info.get("pixel_scale") or info.get("scale") or default_scale(level)
        return cls(float(level), float(scale))

    def unit(self, m: np.ndarray) -> np.ndarray:
        """Map values -> [0, 1], 0.5 at ``level`` (NaN and inf -> the ends)."""
        z = (np.asarray(m, dtype=np.float32) - np.float32(self.level)) / np.float32(self.scale or 1.0)
        z = np.nan_to_num(np.clip(z, -60.0, 60.0), nan=-60.0)
        return 1.0 / (1.0 + np.exp(-z))

    def png_info(self) -> Any:
        """PNG text chunks recording this scale (``insightad.map_level``, ``insightad.map_scale``)."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("insightad.map_level", repr(self.level))
        info.add_text("insightad.map_scale", repr(self.scale))
        info.add_text("insightad.colors", "v = 1/(1+exp(-(map-level)/scale)) through jet; 0.5 = level")
        return info

    def value_at(self, v: float) -> float:
        """The map value drawn with unit value ``v`` (0 < v < 1): the inverse of ``unit``."""
        return float(self.level + self.scale * np.log(v / (1.0 - v)))


def colorize(m: np.ndarray, scale: MapScale, alpha: bool = False) -> np.ndarray:
    """A map (H, W) -> uint8 RGB (H, W, 3) in the one colour convention; with ``alpha``, RGBA whose
    opacity grows with the unit value as in ``blend`` (regions well below the level stay clear)."""
    v = scale.unit(m)
    rgb = LUT[np.round(v * 255.0).astype(np.uint8)]
    if not alpha:
        return rgb
    a = np.round(255.0 * v ** 1.5).astype(np.uint8)[..., None]
    return np.concatenate([rgb, a], axis=-1)


def blend(rgb: np.ndarray, m: np.ndarray, scale: MapScale, max_alpha: float = 0.6) -> np.ndarray:
    """An image (H, W, 3) with its map coloured over it; opacity grows with the unit value, so regions
    well below the level stay almost transparent."""
    v = scale.unit(m)
    alpha = (max_alpha * v ** 1.5)[..., None]
    heat = LUT[np.round(v * 255.0).astype(np.uint8)].astype(np.float32)
    return np.clip(np.asarray(rgb, np.float32) * (1 - alpha) + heat * alpha + 0.5, 0, 255).astype(np.uint8)


TICKS = (0.05, 0.25, 0.5, 0.75, 0.95)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def tick_labels(values: list[float]) -> list[str]:
    """``values`` with 3 significant digits, or as many more (up to 9) as keep them apart: a narrow spread about a
    large level (632 +- 0.04, a validation of 2 normals) labelled every tick of the colour bar '632'."""
    labels = [f"{v:.3g}" for v in values]
    for digits in range(4, 10):
        if len(set(labels)) == len(labels):
            break
        labels = [f"{v:.{digits}g}" for v in values]
    return labels


def colorbar(scale: MapScale, height: int = 256, width: int = 110) -> Image.Image:
    """A vertical colour bar labelled with the raw map values it stands for (threshold marked)."""
    bar_w = max(12, width // 5)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pad = 8
    inner = height - 2 * pad
    column = LUT[np.round(np.linspace(1.0, 0.0, inner) * 255).astype(np.uint8)]
    canvas.paste(Image.fromarray(np.repeat(column[:, None, :], bar_w, axis=1)), (4, pad))
    draw = ImageDraw.Draw(canvas)
    fnt = font(max(9, height // 22))
    for v, value in zip(TICKS, tick_labels([scale.value_at(v) for v in TICKS])):
        y = pad + round((1.0 - v) * (inner - 1))
        label = value + (" (thr)" if v == 0.5 else "")
        draw.line([(4, y), (4 + bar_w + 3, y)], fill=(0, 0, 0), width=2 if v == 0.5 else 1)
        draw.text((bar_w + 10, y - getattr(fnt, "size", 10) // 2), label, fill=(0, 0, 0), font=fnt)
    return canvas


def with_colorbar(picture: Image.Image, scale: MapScale) -> Image.Image:
    """``picture`` with the colour bar to its right, as tall as the picture."""
    bar = colorbar(scale, height=max(120, picture.height), width=max(90, picture.height // 3))
    out = Image.new("RGB", (picture.width + bar.width, max(picture.height, bar.height)), (255, 255, 255))
    out.paste(picture.convert("RGB"), (0, 0))
    out.paste(bar, (picture.width, 0))
    return out
