"""Augmentation of normal images (rotation, shift, shear, zoom, flips), deterministic by seed.

Built from torchvision's functional transforms; the border is padded by reflection (textures) or
edge repetition (objects on a plain background) before the affine warp and cropped back
afterwards, so rotated corners show plausible content instead of invented black triangles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from insightad.config import AugmentParams


@dataclass(frozen=True)
class AffineDraw:
    """One random draw of the transform's parameters."""

    angle: float
    translate: tuple[int, int]
    scale: float
    shear: tuple[float, float]
    hflip: bool
    vflip: bool


def draw(params: AugmentParams, size: tuple[int, int], rng: np.random.Generator) -> AffineDraw:
    """Sample parameters; ``size`` is (width, height)."""
    w, h = size
    angle = float(rng.uniform(-params.rotation, params.rotation)) if params.rotation else 0.0
    tx = int(round(rng.uniform(-params.shift, params.shift) * w)) if params.shift else 0
    ty = int(round(rng.uniform(-params.shift, params.shift) * h)) if params.shift else 0
    scale = float(rng.uniform(1 - params.zoom, 1 + params.zoom)) if params.zoom else 1.0
    shear = math.degrees(math.atan(float(rng.uniform(-params.shear, params.shear)))) if params.shear else 0.0
    return AffineDraw(angle, (tx, ty), scale, (shear, 0.0),
                      bool(params.hflip and rng.random() < 0.5), bool(params.vflip and rng.random() < 0.5))


def needed_padding(d: AffineDraw, w: int, h: int) -> int:
    """Pixels of border the warp can reach beyond the image for this draw (a safe upper bound)."""
    half_diag = 0.5 * math.hypot(w, h)
    reach = (half_diag + math.hypot(*d.translate)) / d.scale * (1 + abs(math.tan(math.radians(d.shear[0]))))
    return max(0, int(math.ceil(reach - 0.5 * min(w, h))) + 2)


def _pad(img: Image.Image, amount: int, mode: str) -> Image.Image:
    """Pad by ``amount`` on every side; reflection is applied in steps (it cannot exceed the size)."""
    done = 0
    while done < amount:
        step = min(amount - done, img.width - 1, img.height - 1) if mode == "reflect" else amount - done
        img = TF.pad(img, [step, step, step, step], padding_mode=mode)
        done += step
    return img


def auto_fill(img: Image.Image, plain_std: float = 8.0) -> str:
    """``edge`` for an object on a plain background (the border barely varies), else ``reflect``."""
    a = np.asarray(img, dtype=np.float32)
    b = max(1, min(a.shape[0], a.shape[1]) // 50)
    ring = np.concatenate([a[:b].reshape(-1), a[-b:].reshape(-1), a[:, :b].reshape(-1), a[:, -b:].reshape(-1)])
    return "edge" if float(ring.std()) < plain_std else "reflect"


def apply(img: Image.Image, d: AffineDraw, fill: str = "auto") -> Image.Image:
    """Warp one image with drawn parameters (Pillow kernels, uint8); same size and mode out."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if fill == "auto":
        fill = auto_fill(img)
    w, h = img.size
    pad = 0 if fill == "constant" else needed_padding(d, w, h)
    out = _pad(img, pad, fill) if pad else img
    out = TF.affine(out, angle=d.angle, translate=list(d.translate), scale=d.scale, shear=list(d.shear),
                    interpolation=InterpolationMode.BILINEAR, fill=0)
    if pad:
        out = TF.center_crop(out, [h, w])
    if d.hflip:
        out = TF.horizontal_flip(out)
    if d.vflip:
        out = TF.vertical_flip(out)
    return out


def augment(img: Image.Image, params: AugmentParams, seed: int) -> Image.Image:
    """One augmented copy of ``img``, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return apply(img, draw(params, img.size, rng), params.fill)
