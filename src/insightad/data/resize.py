"""The one image resize of InsightAD, the same in Python and inside the exported ONNX graph.

Definition: separable, float, antialiased bilinear. Along each axis, output pixel ``i`` has its centre
at ``c = (i + 0.5) * n_in / n_out`` in input coordinates; input pixel ``j`` (centre ``j + 0.5``) weighs
``max(0, 1 - |j + 0.5 - c| / s)`` with ``s = max(1, n_in / n_out)`` (the triangle widens by the scale
when downsampling, so every input pixel counts), only pixels inside the image count, and the weights
of each output pixel are divided by their sum. No rounding anywhere: the result stays float.

That is ONNX ``Resize`` with ``mode="linear", antialias=1, coordinate_transformation_mode="half_pixel",
exclude_outside=1`` (``RESIZE_ONNX_ATTRIBUTES``), and Pillow's BILINEAR filter computed on 32-bit float
("F") images, which is what ``resize`` runs (C code, double-precision weights). ``resize_weights`` is
the definition written out as matrices: the tests hold both implementations to it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

RESIZE_ONNX_ATTRIBUTES = {"mode": "linear", "antialias": 1, "coordinate_transformation_mode": "half_pixel",
                          "exclude_outside": 1}


@lru_cache(maxsize=32)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of the definition along one axis (read-only, cached per size pair)."""
    scale = n_in / n_out
    support = max(1.0, scale)
    centres = (np.arange(n_out) + 0.5) * scale
    dist = np.abs(np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / support
    w = np.clip(1.0 - dist, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    w.setflags(write=False)
    return w


def resize_reference(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) -> float32 (..., h, w) by the two weight matrices: the definition, for tests."""
    h, w = size
    a = resize_weights(x.shape[-2], h) @ x.astype(np.float64)
    return (a @ resize_weights(x.shape[-1], w).T).astype(np.float32)


def resize_image(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A decoded 8-bit L or RGB image -> float32 (C, h, w), values 0..255, at ``size`` (height, width)."""
    h, w = size
    bands = img.split()
    if img.size == (w, h):
        return np.stack([np.asarray(b, dtype=np.float32) for b in bands])
    return np.stack([np.asarray(b.convert("F").resize((w, h), Image.Resampling.BILINEAR)) for b in bands])


def resize_array(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 or float (C, H, W) -> float32 (C, h, w) at ``size`` (height, width)."""
    h, w = size
    if x.shape[-2:] == (h, w):
        return x.astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32))
                                .resize((w, h), Image.Resampling.BILINEAR)) for c in x])
