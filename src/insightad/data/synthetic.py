"""Synthetic products with exactly masked defects, so tests and demos need no downloaded data.

Every image is rendered from a seed in three steps:

1. a defect-free *scene* (a texture, or a product on a plain background) with small random
   changes of position, phase and colour, so that normal images form a distribution;
2. optionally one defect painted onto the scene (scratch, blob, crack or missing material),
   only where there is product surface;
3. the same *look* for both versions (contrast, brightness, tint, lighting gradient and sensor
   noise, all drawn from the seed), then rounding to 8 bits.

The mask is the set of pixels where the image with the defect differs from the image without it
by more than :data:`TOLERANCE` grey levels in any channel, so it is exact by construction.
All randomness comes from ``numpy.random.default_rng`` seeded from the arguments: the same
arguments give byte-identical images.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from insightad import config
from insightad.errors import InsightADError
from insightad.io import atomic_write_bytes

TEXTURE_KINDS: tuple[str, ...] = ("grid", "stripes", "weave")
OBJECT_KINDS: tuple[str, ...] = ("disc", "plate", "arrow")
KINDS: tuple[str, ...] = TEXTURE_KINDS + OBJECT_KINDS
DEFECTS: tuple[str, ...] = ("scratch", "blob", "crack", "missing")
LAYOUTS: tuple[str, ...] = tuple(name for name in config.LAYOUTS if name != "images")  # those with defects
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg", "bmp", "tiff")

TOLERANCE = 8  # grey levels: a pixel is in the mask when it changed by more than this in any channel
MIN_SIZE = 32
_ATTEMPTS = 12  # a defect that ends up (nearly) invisible is drawn again, deterministically
_FORMAT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}

Array = np.ndarray


@dataclass(frozen=True)
class _Scene:
    """A defect-free rendering, before lighting and noise (float RGB, 0..255)."""

    rgb: Array  # (H, W, 3) float32
    background: Array  # (H, W, 3) float32: what shows where material is missing
    coverage: Array  # (H, W) float32 in [0, 1]: how much of each pixel is product surface
    silhouette: Array  # (H, W) bool: the product's outline with holes filled (all True for textures)
    is_object: bool


@dataclass(frozen=True)
class _Look:
    """Per-image photometric changes shared by the normal and the defective rendering."""

    contrast: float
    brightness: Array  # (H, W) float32: overall brightness times a mild lighting gradient
    tint: Array  # (3,) float32
    noise: Array  # (H, W, 3) float32


# ------------------------------------------------------------------------------------ helpers
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x), read-only and cached per size."""
    c = np.arange(size, dtype=np.float32) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _colour(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 0.03) -> Array:
    """``rgb`` with a small random change of level and a smaller one of hue (slight colour variation)."""
    change = rng.uniform(-amount, amount) + rng.uniform(-amount / 3, amount / 3, 3)
    return np.asarray(rgb, dtype=np.float32) * (1 + change).astype(np.float32)


def _lerp(rgb: Array, colour: Array, alpha: Array) -> Array:
    """Blend ``colour`` (an (3,) colour or an (H, W, 3) image) over ``rgb`` with per-pixel ``alpha``."""
    a = alpha[..., None]
    return rgb * (1 - a) + colour * a


def _ring(r: Array, radius: float, width: float) -> Array:
    """Anti-aliased ring of ``width`` pixels at ``radius``."""
    return np.clip(width / 2 + 0.5 - np.abs(r - radius), 0, 1)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> Array:
    """1-D smooth random profile of ``n`` samples, unit standard deviation."""
    z = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma, mode="wrap")
    return (z / (z.std() + 1e-9)).astype(np.float32)


def _polygon_coverage(points: Iterable[tuple[float, float]], size: int, ss: int = 4) -> Array:
    """Fraction of each pixel inside a polygon given in pixel coordinates (supersampled ``ss`` x)."""
    img = Image.new("L", (size * ss, size * ss), 0)
    ImageDraw.Draw(img).polygon([(x * ss - 0.5, y * ss - 0.5) for x, y in points], fill=255)
    return np.asarray(img.reduce(ss), dtype=np.float32) / 255.0


def _polyline_alpha(points: Array, widths: Array, size: int) -> Array:
    """Anti-aliased coverage of a polyline (``points`` (N, 2) as x, y; ``widths`` (N-1,) pixels)."""
    out = np.zeros((size, size), dtype=np.float32)
    pad = float(widths.max()) / 2 + 2
    x0, y0 = (max(0, int(math.floor(v - pad))) for v in points.min(0))
    x1, y1 = (min(size, int(math.ceil(v + pad))) for v in points.max(0))
    if x0 >= x1 or y0 >= y1:
        return out
    gy, gx = _grid(size)
    px, py = gx[y0:y1, x0:x1, None], gy[y0:y1, x0:x1, None]
    a, ab = points[:-1].astype(np.float32), np.diff(points, axis=0).astype(np.float32)
    length2 = np.maximum((ab ** 2).sum(1), 1e-6)
    t = np.clip(((px - a[:, 0]) * ab[:, 0] + (py - a[:, 1]) * ab[:, 1]) / length2, 0, 1)
    d = np.hypot(px - a[:, 0] - t * ab[:, 0], py - a[:, 1] - t * ab[:, 1])
    out[y0:y1, x0:x1] = np.clip(widths.astype(np.float32) / 2 + 0.5 - d, 0, 1).max(-1)
    return out


def _texture_scene(rgb: Array, backing: Array) -> _Scene:
    size = rgb.shape[0]
    return _Scene(rgb.astype(np.float32), np.broadcast_to(backing, rgb.shape).astype(np.float32),
                  np.ones((size, size), np.float32), np.ones((size, size), bool), is_object=False)


def _object_scene(rgb: Array, bg: Array, coverage: Array, silhouette: Array) -> _Scene:
    rgb = _lerp(np.broadcast_to(bg, rgb.shape), rgb, coverage)
    return _Scene(rgb.astype(np.float32), np.broadcast_to(bg, rgb.shape).astype(np.float32),
                  coverage.astype(np.float32), silhouette, is_object=True)


# ----------------------------------------------------------------------------------- textures
def _render_grid(rng: np.random.Generator, size: int) -> _Scene:
    """A woven mesh: dark threads on a light ground, random phase, per-cell shade."""
    s = size / 128
    y, x = _grid(size)
    a = math.radians(rng.uniform(-1.0, 1.0))
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    period = 16 * s * rng.uniform(0.98, 1.02)
    pu, pv = rng.uniform(0, period, 2)
    half = 1.3 * s
    cells = (1 + rng.uniform(-0.035, 0.035, (16, 16))).astype(np.float32)
    ground, thread, backing = _colour(rng, (198, 188, 160)), _colour(rng, (92, 82, 66)), _colour(rng, (38, 34, 30))

    def lines(t: Array, phase: float) -> Array:
        return np.clip(half + 0.5 - np.abs(np.mod(t - phase, period) - period / 2), 0, 1)

    line = np.maximum(lines(u, pu), lines(v, pv))
    iu = np.floor((u - pu) / period).astype(np.int64) % 16
    iv = np.floor((v - pv) / period).astype(np.int64) % 16
    base = ground * cells[iv, iu][..., None]
    return _texture_scene(_lerp(base, thread, line), backing)


def _render_stripes(rng: np.random.Generator, size: int) -> _Scene:
    """Diagonal two-tone stripes with a fine twill, random phase and tiny angle change."""
    s = size / 128
    y, x = _grid(size)
    a = math.radians(60 + rng.uniform(-1.5, 1.5))
    t = x * math.cos(a) + y * math.sin(a)
    t2 = -x * math.sin(a) + y * math.cos(a)
    period = 11 * s * rng.uniform(0.98, 1.02)
    phase, phase2 = rng.uniform(0, 2 * math.pi, 2)
    dark, light, backing = _colour(rng, (40, 60, 116)), _colour(rng, (178, 194, 224)), _colour(rng, (24, 24, 30))
    profile = 0.5 + 0.5 * np.tanh(2.2 * np.sin(2 * np.pi * t / period + phase)) / math.tanh(2.2)
    twill = 1 + 0.05 * np.sin(2 * np.pi * (t + t2) / (3.2 * s) + phase2)
    rgb = _lerp(np.broadcast_to(dark, (size, size, 3)), light, profile) * twill[..., None]
    return _texture_scene(rgb, backing)


def _render_weave(rng: np.random.Generator, size: int) -> _Scene:
    """A basket weave: square cells of three threads, alternating horizontal and vertical."""
    s = size / 128
    y, x = _grid(size)
    cell = 18 * s * rng.uniform(0.98, 1.02)
    ou, ov = rng.uniform(0, 2 * cell, 2)
    u, v = x + ou, y + ov
    horizontal = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    pitch = cell / 3
    across = np.where(horizontal, v, u)
    along = np.where(horizontal, u, v)
    profile = np.sin(np.pi * np.mod(across, pitch) / pitch) ** 0.7
    dip = 0.72 + 0.28 * np.sin(np.pi * np.mod(along, cell) / cell) ** 0.5
    wicker, backing = _colour(rng, (208, 172, 120)), _colour(rng, (34, 24, 16))
    value = (0.22 + 0.78 * profile * dip).astype(np.float32)
    return _texture_scene(_lerp(np.broadcast_to(backing, (size, size, 3)), wicker, value), backing)


# ------------------------------------------------------------------------------------ objects
def _render_disc(rng: np.random.Generator, size: int) -> _Scene:
    """A bottle cap seen from above: knurled rim, groove, embossed ring, specular highlight."""
    s = size / 128
    y, x = _grid(size)
    cx, cy = size / 2 + rng.uniform(-3, 3, 2) * s
    radius = 0.36 * size * rng.uniform(0.985, 1.015)
    phase = rng.uniform(0, 2 * math.pi)
    bg, cap = _colour(rng, (58, 62, 70)), _colour(rng, (200, 52, 44), 0.04)
    dx, dy = x - cx, y - cy
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    rim = np.clip((r - 0.86 * radius) / (1.5 * s), 0, 1)
    shade = 1 - rim * (0.2 + 0.2 * np.cos(48 * theta + phase))
    shade *= 1 - 0.5 * _ring(r, 0.83 * radius, 2.2 * s)
    shade *= 1 - 0.22 * _ring(r, 0.5 * radius, 1.6 * s)
    shade *= 1 + 0.15 * _ring(r, 0.5 * radius + 1.8 * s, 1.2 * s)
    shade *= 1 - 0.25 * np.clip((r - 0.95 * radius) / (0.05 * radius), 0, 1)
    hx, hy = dx + 0.3 * radius, dy + 0.3 * radius
    highlight = 0.35 * np.exp(-(hx ** 2 + hy ** 2) / (2 * (0.26 * radius) ** 2))
    surface = cap * shade[..., None] + (255 - cap) * highlight[..., None]
    coverage = np.clip(radius - r + 0.5, 0, 1)
    return _object_scene(surface, bg, coverage, coverage > 0.5)


def _render_plate(rng: np.random.Generator, size: int) -> _Scene:
    """A brushed-metal rounded square with four corner holes and a centre hole."""
    s = size / 128
    y, x = _grid(size)
    cx, cy = size / 2 + rng.uniform(-3, 3, 2) * s
    a = math.radians(rng.uniform(-2.5, 2.5))
    half = 0.33 * size * rng.uniform(0.985, 1.015)
    corner = 0.09 * size
    bg, metal = _colour(rng, (36, 39, 46)), _colour(rng, (172, 176, 182), 0.025)
    streaks = _smooth_noise(rng, 256, 1.5)
    dx, dy = x - cx, y - cy
    u, v = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
    qx, qy = np.abs(u) - (half - corner), np.abs(v) - (half - corner)
    d = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - corner
    body = np.clip(0.5 - d, 0, 1)
    holes = [(hu * size, hv * size, 0.045 * size) for hu in (-0.2, 0.2) for hv in (-0.2, 0.2)]
    holes.append((0.0, 0.0, 0.075 * size))
    open_ = np.ones_like(body)
    rim = np.zeros_like(body)
    for hu, hv, hr in holes:
        dh = np.hypot(u - hu, v - hv) - hr
        open_ *= np.clip(dh + 0.5, 0, 1)
        rim = np.maximum(rim, np.clip(1 - np.abs(dh - 1.5 * s) / (1.5 * s), 0, 1))
    brushed = np.interp(v / size * 100 + 128, np.arange(256), streaks).astype(np.float32)
    bevel = np.clip(1 + d / (2.5 * s), 0, 1)
    shade = (1 + 0.035 * brushed) * (1 - 0.3 * rim) * (1 - 0.22 * bevel) * (1 - 0.12 * (u + v) / size)
    return _object_scene(metal * shade[..., None], bg, body * open_, body > 0.5)


_ARROW = np.array([(0.0, -0.40), (0.25, -0.08), (0.08, -0.08), (0.08, 0.16), (0.22, 0.36),
                   (-0.08, 0.36), (-0.08, -0.08), (-0.25, -0.08)], dtype=np.float64)
_ARROW_HOLE = (-0.08, -0.17, 0.033)  # a hole on the left of the head: the arrow is not mirror-symmetric


def _render_arrow(rng: np.random.Generator, size: int) -> _Scene:
    """An orange arrow pointing up with a one-sided tail fin and an off-centre hole (rotation ±8°)."""
    s = size / 128
    y, x = _grid(size)
    cx, cy = size / 2 + rng.uniform(-3, 3, 2) * s
    a = math.radians(rng.uniform(-8, 8))
    bg, body = _colour(rng, (212, 212, 206), 0.02), _colour(rng, (228, 132, 36), 0.04)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = _ARROW @ rot.T * size + (cx, cy)
    silhouette = _polygon_coverage(map(tuple, pts), size)
    hx, hy = np.array(_ARROW_HOLE[:2]) @ rot.T * size + (cx, cy)
    hole = np.clip(np.hypot(x - hx, y - hy) - _ARROW_HOLE[2] * size + 0.5, 0, 1)
    inside = ndimage.distance_transform_edt(silhouette > 0.5).astype(np.float32)
    along = ((x - cx) * math.sin(a) - (y - cy) * math.cos(a)) / size  # +: towards the tip
    shade = (0.82 + 0.18 * np.clip(inside / (3 * s), 0, 1)) * (1 + 0.1 * along)
    return _object_scene(body * shade[..., None], bg, silhouette * hole, silhouette > 0.5)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "grid": _render_grid, "stripes": _render_stripes, "weave": _render_weave,
    "disc": _render_disc, "plate": _render_plate, "arrow": _render_arrow,
}


# ------------------------------------------------------------------------------------ defects
def _pick_point(rng: np.random.Generator, scene: _Scene, margin: float) -> Array:
    """A random (x, y) pixel centre on the product, at least ``margin`` px from its edge if possible."""
    size = scene.coverage.shape[0]
    if scene.is_object:
        dist = ndimage.distance_transform_edt(scene.coverage > 0.99)
    else:
        y, x = _grid(size)
        dist = np.minimum(np.minimum(x, y), np.minimum(size - x, size - y))
    flat = dist.ravel()
    for m in (margin, margin / 2, 1.0, 0.0):
        idx = np.flatnonzero(flat > m)
        if idx.size:
            break
    k = int(idx[rng.integers(idx.size)])
    return np.array([k % size + 0.5, k // size + 0.5])


def _on_product(scene: _Scene, p: Array) -> bool:
    size = scene.coverage.shape[0]
    x, y = int(p[0]), int(p[1])
    return 0 <= x < size and 0 <= y < size and scene.coverage[y, x] > 0.99


def _scratch(rng: np.random.Generator, scene: _Scene) -> Array:
    """A thin bright or dark straight line or arc across the surface."""
    size = scene.coverage.shape[0]
    s = size / 128
    p0 = _pick_point(rng, scene, 3 * s)
    lengths = rng.uniform(0.2, 0.4, 16) * size
    angles = rng.uniform(0, 2 * math.pi, 16)
    p2 = p0 + lengths[0] * np.array([math.cos(angles[0]), math.sin(angles[0])])
    for scale in (1.0, 0.6, 0.35):  # prefer long scratches, but keep both ends on the product
        ends = p0 + scale * lengths[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
        ok = [i for i in range(16) if _on_product(scene, ends[i]) and _on_product(scene, (p0 + ends[i]) / 2)]
        if ok:
            p2 = ends[ok[0]]
            break
    bend = rng.uniform(-0.25, 0.25) * np.linalg.norm(p2 - p0) if rng.random() < 0.5 else 0.0
    normal = np.array([p0[1] - p2[1], p2[0] - p0[0]]) / max(np.linalg.norm(p2 - p0), 1e-6)
    p1 = (p0 + p2) / 2 + bend * normal
    t = np.linspace(0, 1, 24)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
    width = rng.uniform(1.2, 2.0) * s
    colour = np.array((240, 238, 230) if rng.random() < 0.5 else (28, 26, 24), np.float32)
    alpha = 0.9 * _polyline_alpha(pts, np.full(len(pts) - 1, width), size) * scene.coverage
    return _lerp(scene.rgb, colour, alpha)


def _walk(rng: np.random.Generator, start: Array, heading: float, n: int, step: float) -> Array:
    """A jagged random walk: a slowly drifting heading plus a large independent jitter per step."""
    headings = heading + np.cumsum(rng.normal(0, 0.12, n)) + rng.normal(0, 0.6, n)
    steps = step * rng.uniform(0.6, 1.4, n)[:, None] * np.stack([np.cos(headings), np.sin(headings)], 1)
    return np.vstack([start, start + np.cumsum(steps, 0)])


def _crack(rng: np.random.Generator, scene: _Scene) -> Array:
    """A dark jagged polyline, 1-3 px wide and tapering, with up to two branches."""
    size = scene.coverage.shape[0]
    s = size / 128
    n = int(rng.integers(22, 40))
    start = _pick_point(rng, scene, 4 * s)
    ys, xs = np.nonzero(scene.silhouette)  # head roughly towards the middle, so the crack stays in view
    heading = math.atan2(ys.mean() + 0.5 - start[1], xs.mean() + 0.5 - start[0]) + rng.uniform(-1, 1)
    main = _walk(rng, start, heading, n, 1.6 * s)
    width = rng.uniform(1.3, 2.6) * s
    alpha = _polyline_alpha(main, np.maximum(width * (0.45 + 0.55 * np.sin(np.linspace(0.1, 3.0, n))), s), size)
    for _ in range(int(rng.integers(0, 3))):
        k = int(rng.integers(n // 5, 4 * n // 5))
        d = main[k + 1] - main[k]
        heading = math.atan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        nb = max(4, int(n * rng.uniform(0.25, 0.5)))
        branch = _walk(rng, main[k], heading, nb, 1.5 * s)
        alpha = np.maximum(alpha, _polyline_alpha(branch, np.maximum(0.6 * width * np.linspace(1, 0.6, nb), s),
                                                  size))
    colour = _colour(rng, (22, 18, 16), 0.1)
    return _lerp(scene.rgb, colour, 0.92 * alpha * scene.coverage)


def _shape(rng: np.random.Generator, size: int, centre: Array, a: float, b: float) -> tuple[Array, float]:
    """Normalised radius of an irregular ellipse (1 on its border) and its mean radius in px."""
    y, x = _grid(size)
    ang = rng.uniform(0, math.pi)
    dx, dy = x - centre[0], y - centre[1]
    du, dv = dx * math.cos(ang) + dy * math.sin(ang), -dx * math.sin(ang) + dy * math.cos(ang)
    rr = np.hypot(du / a, dv / b)
    theta = np.arctan2(dv / b, du / a)
    amps, phases = rng.uniform(0, 0.09, 2), rng.uniform(0, 2 * math.pi, 2)
    wobble = 1 + amps[0] * np.cos(2 * theta + phases[0]) + amps[1] * np.cos(3 * theta + phases[1])
    return rr / wobble, (a + b) / 2


_STAINS = ((98, 64, 30), (44, 42, 40), (236, 232, 212), (70, 122, 58), (62, 82, 152))


def _luma(rgb: Array) -> Array:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _blob(rng: np.random.Generator, scene: _Scene) -> Array:
    """An elliptical stain of another colour and brightness with a soft edge."""
    size = scene.coverage.shape[0]
    a = rng.uniform(0.06, 0.11) * size
    b = a * rng.uniform(0.55, 1.0)
    centre = _pick_point(rng, scene, 0.6 * a)
    rr, _ = _shape(rng, size, centre, a, b)
    local = scene.rgb[int(centre[1]), int(centre[0])]
    stains = np.array(_STAINS, np.float32)
    contrast = np.abs(_luma(stains) - _luma(local))
    choices = np.flatnonzero(contrast >= 60)
    colour = stains[choices[rng.integers(choices.size)] if choices.size else int(contrast.argmax())]
    strength = rng.uniform(0.6, 0.85)
    soft = np.clip((1.0 - rr) / 0.45, 0, 1)
    alpha = strength * soft * soft * (3 - 2 * soft) * scene.coverage
    return _lerp(scene.rgb, colour, alpha)


def _missing(rng: np.random.Generator, scene: _Scene) -> Array:
    """A piece of material gone: background (or the texture's backing) shows through."""
    size = scene.coverage.shape[0]
    r = rng.uniform(0.07, 0.12) * size
    if scene.is_object:  # bite out of the outline, moved a little inwards
        sil = scene.silhouette
        edge = np.flatnonzero((sil & ~ndimage.binary_erosion(sil)).ravel())
        k = int(edge[rng.integers(edge.size)])
        p = np.array([k % size + 0.5, k // size + 0.5])
        ys, xs = np.nonzero(sil)
        inward = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) - p
        centre = p + inward / max(np.linalg.norm(inward), 1e-6) * rng.uniform(0.1, 0.4) * r
    else:
        centre = _pick_point(rng, scene, 0.8 * r)
    rr, mean_r = _shape(rng, size, centre, r, r * rng.uniform(0.6, 1.0))
    alpha = np.clip((1 - rr) * mean_r + 0.5, 0, 1)
    return _lerp(scene.rgb, scene.background, alpha)


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene], Array]] = {
    "scratch": _scratch, "blob": _blob, "crack": _crack, "missing": _missing,
}


# ---------------------------------------------------------------------------------- rendering
def _draw_look(rng: np.random.Generator, size: int) -> _Look:
    y, x = _grid(size)
    contrast = float(rng.uniform(0.95, 1.05))
    level = rng.uniform(0.95, 1.05)
    ang, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.05)
    gradient = 1 + amp * ((x - size / 2) * math.cos(ang) + (y - size / 2) * math.sin(ang)) / size
    tint = (1 + rng.uniform(-0.012, 0.012, 3)).astype(np.float32)
    sigma = rng.uniform(1.5, 3.0)
    noise = (rng.standard_normal((size, size, 3), dtype=np.float32) * (0.6 * sigma)
             + rng.standard_normal((size, size, 1), dtype=np.float32) * (0.8 * sigma))
    return _Look(contrast, (level * gradient).astype(np.float32), tint, noise)


def _finish(rgb: Array, look: _Look, grayscale: bool) -> Array:
    """Apply the look and round to 8 bits; (H, W, 3) RGB or (H, W) L."""
    out = (rgb - 128) * look.contrast + 128
    out = out * look.brightness[..., None] * look.tint + look.noise
    img = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if grayscale:
        img = np.asarray(Image.fromarray(img).convert("L"))
    return img


def _check(kind: object, defect: object, size: object, seed: object) -> None:
    if not isinstance(kind, str) or kind not in KINDS:
        raise InsightADError(f"synthetic kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if defect is not None and (not isinstance(defect, str) or defect not in DEFECTS):
        raise InsightADError(f"synthetic defect: expected None or one of {', '.join(DEFECTS)}, got {defect!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise InsightADError(f"synthetic size: expected an integer >= {MIN_SIZE}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InsightADError(f"synthetic seed: expected a non-negative integer, got {seed!r}")


def _scene_and_look(kind: str, size: int, seed: int) -> tuple[_Scene, _Look]:
    rng = np.random.default_rng([int(seed), 0])
    scene = _RENDERERS[kind](rng, int(size))
    return scene, _draw_look(rng, int(size))


def make_image(kind: str = "disc", defect: str | None = None, *, size: int = 128, seed: int = 0,
               grayscale: bool = False) -> tuple[Image.Image, np.ndarray]:
    """One synthetic product image and the exact bool mask of its defect (all False when ``defect`` is None).

    The same ``seed`` gives the same normal product with and without a defect, so the mask is
    precisely where the two 8-bit images differ by more than :data:`TOLERANCE` in any channel.
    A defect that would change too few pixels is redrawn (deterministically), so masks are never empty.
    """
    _check(kind, defect, size, seed)
    size = int(size)
    scene, look = _scene_and_look(kind, size, int(seed))
    normal = _finish(scene.rgb, look, grayscale)
    if defect is None:
        return Image.fromarray(normal), np.zeros((size, size), bool)
    rng = np.random.default_rng([int(seed), 1, DEFECTS.index(defect)])
    min_pixels = max(12, int(0.002 * size * size))
    for _ in range(_ATTEMPTS):
        image = _finish(_DEFECTS[defect](rng, scene), look, grayscale)
        diff = np.abs(image.astype(np.int16) - normal.astype(np.int16))
        mask = (diff.max(-1) if diff.ndim == 3 else diff) > TOLERANCE
        if mask.sum() >= min_pixels:
            break
    return Image.fromarray(image), mask


def object_mask(kind: str = "disc", *, size: int = 128, seed: int = 0) -> np.ndarray:
    """Bool mask of the product surface in the normal image of ``make_image(kind, seed=seed)``.

    All True for textures; for objects it excludes the background and holes. Useful to check
    that defects lie on the product, or to evaluate only on the part.
    """
    _check(kind, None, size, seed)
    scene, _ = _scene_and_look(kind, int(size), int(seed))
    return scene.coverage > 0.5


# ------------------------------------------------------------------------------------ datasets
def _image_seed(seed: int, split: str, defect: str, index: int) -> int:
    """A distinct, stable seed per image from (seed, split, defect, index)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), zlib.crc32(defect.encode()), int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _save(image: Image.Image, path: Path, image_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_format == "jpg":
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path, format={"png": "PNG", "bmp": "BMP", "tiff": "TIFF"}[image_format])


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, format="PNG")


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InsightADError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


MARKER = ".insightad-synthetic.json"  # in the root of every generated dataset: what may be written over
GENERATED = ("train", "test", "ground_truth", "normal", "abnormal", "masks", "Negative", "Positive")


def _claim(root: Path) -> None:
    """Make ``root`` ready for a generated dataset: new, empty, or one generated before (its image folders are
    removed, so a rerun with other settings never mixes two datasets). Anything else is refused: ``demo --out``
    on a project folder wrote over the user's ``data/`` images, or trained on them beside the generated ones."""
    if root.exists() and not root.is_dir():
        raise InsightADError(f"{root}: expected a folder for the generated dataset, got a file")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            first = sorted(p.name for p in root.iterdir())[0]
            raise InsightADError(f"{root}: already holds files that no generated dataset wrote (e.g. {first}); a "
                                 "generated dataset goes into a new or empty folder, or over one generated before: "
                                 "choose another folder (demo: --out), or delete it if an older insightad demo made it "
                                 "(those left no mark)")
        for name in GENERATED:
            shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def write_dataset(root: str | Path, *, kind: str = "disc", layout: str = "mvtec", n_train: int = 40,
                  n_test_good: int = 10, n_per_defect: int = 5, defects: Iterable[str] = DEFECTS,
                  size: int = 128, seed: int = 0, grayscale: bool = False, image_format: str = "png") -> Path:
    """Write a synthetic dataset in one of the layouts InsightAD reads and return its root.

    ``"mvtec"``: ``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.png``.
    ``"folder"``: ``normal/`` (train and test-good images), ``abnormal/<defect>/``, ``masks/<defect>/``.
    ``"crack"``: ``Negative/`` and ``Positive/`` (no masks). Masks are always PNG (L, 0/255).
    Every image has its own seed derived from (seed, split, defect, index).
    """
    if isinstance(defects, str):
        defects = (defects,)
    defects = tuple(dict.fromkeys(defects))
    for d in defects:
        _check(kind, d, size, seed)
    _check(kind, None, size, seed)
    if layout not in LAYOUTS:
        raise InsightADError(f"synthetic layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    fmt = _FORMAT_ALIASES.get(str(image_format).lower().lstrip("."), str(image_format).lower().lstrip("."))
    if fmt not in IMAGE_FORMATS:
        raise InsightADError(f"synthetic image_format: expected one of {', '.join(IMAGE_FORMATS)}, "
                             f"got {image_format!r}")
    n_train, n_test_good = _count("n_train", n_train), _count("n_test_good", n_test_good)
    n_per_defect = _count("n_per_defect", n_per_defect)
    root = Path(root).expanduser()
    _claim(root)
    atomic_write_bytes(root / MARKER, json.dumps({"kind": kind, "layout": layout, "seed": int(seed), "size": int(size),
                                                  "defects": list(defects)}).encode())
    ext = "." + fmt
    width = max(3, len(str(max(n_train, n_test_good, n_per_defect, 1) - 1)))

    def image(split: str, defect: str | None, index: int) -> tuple[Image.Image, np.ndarray]:
        return make_image(kind, defect, size=size, seed=_image_seed(seed, split, defect or "good", index),
                          grayscale=grayscale)

    goods = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test_good)]
    if layout == "mvtec":
        for split, i in goods:
            _save(image(split, None, i)[0], root / split / "good" / f"{i:0{width}d}{ext}", fmt)
    else:
        normal_dir = root / ("normal" if layout == "folder" else "Negative")
        wide = max(width, len(str(max(len(goods), 1) - 1)))
        for j, (split, i) in enumerate(goods):
            _save(image(split, None, i)[0], normal_dir / f"{j:0{wide}d}{ext}", fmt)
    for d in defects:
        for i in range(n_per_defect):
            img, mask = image("test", d, i)
            stem = f"{i:0{width}d}"
            if layout == "mvtec":
                _save(img, root / "test" / d / f"{stem}{ext}", fmt)
                _save_mask(mask, root / "ground_truth" / d / f"{stem}_mask.png")
            elif layout == "folder":
                _save(img, root / "abnormal" / d / f"{stem}{ext}", fmt)
                _save_mask(mask, root / "masks" / d / f"{stem}_mask.png")
            else:
                _save(img, root / "Positive" / f"{d}_{stem}{ext}", fmt)
    return root
