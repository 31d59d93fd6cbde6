"""Synthetic defects painted on the user's own normal images, with exact masks, for validation.

Six kinds, none needing external data:

- ``cutpaste``: a rectangle cut from another normal image of the set, pasted elsewhere (CutPaste);
- ``texture``: a Perlin-noise-shaped region blended with a foreign texture made from another
  normal image of the set (rotated, mirrored, recoloured), as in DRAEM;
- ``crack``, ``scratch``, ``blob``, ``missing``: the shapes of the demo's generator
  (:mod:`insightad.data.synthetic`), drawn on the product surface.

The mask is exact by construction: the pixels whose 8-bit value changed by more than
:data:`insightad.data.synthetic.TOLERANCE` in any channel. A defect that would change too few
pixels is drawn again. Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from insightad.data import synthetic as syn
from insightad.errors import InsightADError

DEFECT_KINDS: tuple[str, ...] = ("cutpaste", "texture", "crack", "scratch", "blob", "missing")
_ATTEMPTS = 12


@dataclass(frozen=True)
class SyntheticDefect:
    """One defective image (uint8 (H, W, C) at model size), its exact mask, its kind and source normal."""

    image: np.ndarray
    mask: np.ndarray
    kind: str
    source: int


# ------------------------------------------------------------------------------ scene of a user image
def _border_colour(rgb: np.ndarray) -> np.ndarray:
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(edge, axis=0).astype(np.float32)


def _scene(rgb: np.ndarray) -> syn._Scene:
    """A user image as the demo generator's scene: the product is what differs from the border colour
    (objects on a plain background), else the whole image (textures)."""
    bg = _border_colour(rgb)
    far = np.abs(rgb - bg).max(-1) > 40
    far = ndimage.binary_opening(ndimage.binary_fill_holes(ndimage.binary_closing(far, iterations=2)), iterations=2)
    frac = far.mean()
    if 0.08 < frac < 0.9:
        cov = far.astype(np.float32)
        return syn._Scene(rgb, np.broadcast_to(bg, rgb.shape).astype(np.float32), cov, far, is_object=True)
    size = rgb.shape[0]
    dark = np.percentile(rgb.reshape(-1, 3), 2, axis=0).astype(np.float32) * 0.5
    return syn._Scene(rgb, np.broadcast_to(dark, rgb.shape).astype(np.float32), np.ones((size, size), np.float32),
                      np.ones((size, size), bool), is_object=False)


# ------------------------------------------------------------------------------ perlin noise
def perlin(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise (roughly in [-1, 1]) with ``cells`` lattice cells along (y, x)."""
    h, w = shape
    cy, cx = cells
    angles = rng.uniform(0, 2 * math.pi, (cy + 1, cx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) / h * cy
    x = (np.arange(w) + 0.5) / w * cx
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def dot(oy: int, ox: int) -> np.ndarray:
        return gy[yi[:, None] + oy, xi[None, :] + ox] * (fy - oy) + gx[yi[:, None] + oy, xi[None, :] + ox] * (fx - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (top * (1 - v) + bottom * v) * math.sqrt(2)


# ------------------------------------------------------------------------------ defect kinds
def _cutpaste(rng: np.random.Generator, scene: syn._Scene, donor: np.ndarray) -> np.ndarray:
    size = scene.rgb.shape[0]
    area = rng.uniform(0.02, 0.1) * size * size
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    ph = int(np.clip(round(math.sqrt(area / aspect)), 4, size // 2))
    pw = int(np.clip(round(math.sqrt(area * aspect)), 4, size // 2))
    sy, sx = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
    patch = donor[sy:sy + ph, sx:sx + pw] * rng.uniform(0.85, 1.15, 3).astype(np.float32)  # slight colour jitter
    centre = syn._pick_point(rng, scene, min(ph, pw) / 2)
    ty = int(np.clip(centre[1] - ph / 2, 0, size - ph))
    tx = int(np.clip(centre[0] - pw / 2, 0, size - pw))
    out = scene.rgb.copy()
    out[ty:ty + ph, tx:tx + pw] = patch
    return out


def _texture(rng: np.random.Generator, scene: syn._Scene, donor: np.ndarray) -> np.ndarray:
    size = scene.rgb.shape[0]
    scale = 2 ** int(rng.integers(1, 4))
    noise = perlin((size, size), (scale, scale), rng)
    region = (noise > rng.uniform(0.3, 0.5)).astype(np.float32) * scene.coverage
    if region.sum() < 0.01 * size * size:  # too little: take the strongest noise lobe instead
        region = (noise > np.quantile(noise, 0.95)).astype(np.float32) * scene.coverage
    foreign = np.rot90(donor, int(rng.integers(1, 4)))
    if rng.random() < 0.5:
        foreign = foreign[:, ::-1]
    foreign = foreign[..., rng.permutation(3)] * rng.uniform(0.7, 1.3)  # recoloured: foreign to the set
    beta = rng.uniform(0.5, 1.0)
    return syn._lerp(scene.rgb, np.clip(foreign, 0, 255), beta * region)


def _shape_kind(draw: Callable[[np.random.Generator, syn._Scene], np.ndarray]
                ) -> Callable[[np.random.Generator, syn._Scene, np.ndarray], np.ndarray]:
    return lambda rng, scene, donor: draw(rng, scene)


_DRAW: dict[str, Callable[[np.random.Generator, syn._Scene, np.ndarray], np.ndarray]] = {
    "cutpaste": _cutpaste, "texture": _texture, "crack": _shape_kind(syn._crack),
    "scratch": _shape_kind(syn._scratch), "blob": _shape_kind(syn._blob), "missing": _shape_kind(syn._missing),
}


# ------------------------------------------------------------------------------ public
def _as_rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or a.shape[0] != a.shape[1] or a.shape[0] < syn.MIN_SIZE:
        raise InsightADError(f"synthetic defects: expected square uint8 images of side >= {syn.MIN_SIZE}, "
                             f"got {a.dtype} {a.shape}")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a.astype(np.float32)


def make_defect(image: np.ndarray, kind: str, donor: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (uint8 (H, W) or (H, W, C), square) with one defect of ``kind``; (image, exact mask)."""
    if kind not in DEFECT_KINDS:
        raise InsightADError(f"defect kind: expected one of {', '.join(DEFECT_KINDS)}, got {kind!r}")
    src = np.asarray(image)
    channels = 1 if src.ndim == 2 else src.shape[2]
    rgb, donor_rgb = _as_rgb(src), _as_rgb(donor)
    if donor_rgb.shape != rgb.shape:
        raise InsightADError(f"synthetic defects: donor image {donor_rgb.shape} differs from image {rgb.shape}")
    scene = _scene(rgb)
    rng = np.random.default_rng([int(seed), DEFECT_KINDS.index(kind)])
    min_pixels = max(12, int(0.002 * rgb.shape[0] * rgb.shape[1]))
    for _ in range(_ATTEMPTS):
        out = np.clip(np.rint(_DRAW[kind](rng, scene, donor_rgb)), 0, 255).astype(np.uint8)
        if channels == 1:
            out = np.rint(syn._luma(out.astype(np.float32))).clip(0, 255).astype(np.uint8)[..., None]
        elif channels != 3:
            raise InsightADError(f"synthetic defects: expected 1 or 3 channels, got {channels}")
        orig = src if src.ndim == 3 else src[..., None]
        mask = (np.abs(out.astype(np.int16) - orig.astype(np.int16)).max(-1)) > syn.TOLERANCE
        if mask.sum() >= min_pixels:
            break
    out = out[..., 0] if src.ndim == 2 else out
    return out, mask


def make_defects(normals: Sequence[np.ndarray], seed: int = 0, kinds: Sequence[str] = DEFECT_KINDS,
                 per_image: int = 1) -> list[SyntheticDefect]:
    """``per_image`` defects on each normal image (kinds in equal shares, shuffled by ``seed``); the
    donor for cut-paste and texture is another image of the set."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in DEFECT_KINDS]
    if bad or not kinds:
        raise InsightADError(f"defect kinds: expected some of {', '.join(DEFECT_KINDS)}, got {list(kinds)!r}")
    n = len(normals)
    total = n * int(per_image)
    rng = np.random.default_rng([int(seed), 7])
    order = rng.permutation(np.resize(np.arange(len(kinds)), total))
    out = []
    for j in range(total):
        i = j % n
        donor_i = (i + 1 + int(rng.integers(max(n - 1, 1)))) % n if n > 1 else i
        donor = normals[donor_i] if donor_i != i else np.ascontiguousarray(np.asarray(normals[i])[::-1, ::-1])
        image, mask = make_defect(normals[i], kinds[int(order[j])], donor, seed=int(seed) * 1_000_003 + j)
        out.append(SyntheticDefect(image, mask, kinds[int(order[j])], i))
    return out
