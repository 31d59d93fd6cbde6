"""The preprocessing a model carries: the same function at fit, evaluate, predict, serve and export.

Two halves: ``decode`` + ``resize`` (here, numpy and Pillow only: decode, channel conversion, the
float antialiased bilinear resize of ``data.resize``), and the mean/std normalisation (the first layer
of every model graph, ``backbones.normalize``). The exported graph takes the decoded uint8 image at
its own size and does the same resize itself, so nothing can drift between engines or languages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from insightad.data.images import DEFAULT_MAX_PIXELS, fast_png, load_image
from insightad.data.resize import resize_array, resize_image
from insightad.errors import InsightADError

RESIZE_FILTERS = ("bilinear",)  # float, antialiased (data.resize): the one filter ONNX Resize reproduces
RETIRED_FILTERS = ("bicubic", "nearest", "area")  # Pillow filters of older model files, no longer computed

ImageInput = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Preprocessing:
    """Input size (height, width), channels, resize filter, and the backbone's mean/std."""

    size: tuple[int, int] = (256, 256)
    channels: int = 3
    resize: str = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize in RETIRED_FILTERS:
            raise InsightADError(f"resize: the {self.resize!r} filter is no longer supported (the exported graph "
                                 "could not reproduce it); retrain the model (resize 'bilinear')")
        if self.resize not in RESIZE_FILTERS:
            raise InsightADError(f"resize: expected one of {', '.join(RESIZE_FILTERS)}, got {self.resize!r}")
        if self.channels not in (1, 3):
            raise InsightADError(f"channels: expected 1 or 3, got {self.channels}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(size=tuple(d["size"]), channels=int(d["channels"]), resize=d["resize"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]))

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def image(self, source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Any image source -> a decoded 8-bit image with the model's channels (RGB or L), at its own size.
        An array is (H, W) or (H, W, C) uint8, as Pillow's ``fromarray`` reads it. A file or bytes over
        ``max_pixels`` is refused."""
        if isinstance(source, np.ndarray):
            source = Image.fromarray(source)
        if not isinstance(source, Image.Image):
            return load_image(source, self.channels, max_pixels=max_pixels)
        return source if source.mode == self.mode else source.convert(self.mode)

    def decode(self, source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Any image source -> uint8 (C, H, W) at its own size: what the exported graph takes (a float array
        is rounded to the nearest level)."""
        if isinstance(source, np.ndarray) and source.dtype.kind == "f":
            return np.clip(np.rint(self.float_pixels(source)), 0, 255).astype(np.uint8)
        if isinstance(source, (str, Path, bytes, bytearray)):
            plain = fast_png(source, self.channels, max_pixels)  # most inspection photos: twice as fast as Pillow
            if plain is not None:
                return np.ascontiguousarray(plain.transpose(2, 0, 1))
        arr = np.asarray(self.image(source, max_pixels), dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))

    def resize_array(self, x: np.ndarray) -> np.ndarray:
        """uint8 or float (C, H, W) at any size -> float32 (C, h, w), 0..255, at the model's size."""
        return resize_array(x, self.size)

    def float_pixels(self, arr: np.ndarray) -> np.ndarray:
        """A float array (H, W) or (H, W, C), values 0..255 (e.g. images already at model size) -> float32
        (C, H, W) with the model's channels (RGB -> L with Pillow's ITU-R 601 weights)."""
        a = np.asarray(arr, dtype=np.float32)
        a = a[..., None] if a.ndim == 2 else a
        if a.ndim != 3 or a.shape[2] not in (1, 3):
            raise InsightADError(f"image array: expected (H, W) or (H, W, 1 or 3), got shape {tuple(arr.shape)}")
        if a.shape[2] != self.channels:
            luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            a = np.repeat(a, 3, axis=2) if self.channels == 3 else (a @ luma)[..., None]
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    def load(self, source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
        """Any image source -> (float32 (C, h, w), values 0..255, at the model's size; original (height, width))."""
        if isinstance(source, np.ndarray) and source.dtype.kind == "f":
            x = self.float_pixels(source)
            return resize_array(x, self.size), (x.shape[1], x.shape[2])
        img = self.image(source, max_pixels)
        return resize_image(img, self.size), (img.size[1], img.size[0])
