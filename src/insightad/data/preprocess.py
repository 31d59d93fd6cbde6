"""The preprocessing a model carries: the same function at fit, evaluate, predict, serve and export.

Two halves: ``to_uint8`` (decode, channel conversion, resize: done on the CPU, in data-loader
workers) and ``normalize`` (uint8 -> float, mean/std: part of the model graph, so an exported
model takes the resized uint8 image and nothing can drift between engines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from insightad.data.images import load_image
from insightad.errors import InsightADError

RESIZE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
          "nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}


@dataclass(frozen=True)
class Preprocessing:
    """Input size (height, width), channels, resize filter (Pillow), and the backbone's mean/std."""

    size: tuple[int, int] = (256, 256)
    channels: int = 3
    resize: str = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE:
            raise InsightADError(f"resize: expected one of {', '.join(RESIZE)}, got {self.resize!r}")
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

    def pil_to_uint8(self, img: Image.Image) -> torch.Tensor:
        """A decoded image -> uint8 tensor (C, H, W) at the model's size."""
        img = img.convert("RGB" if self.channels == 3 else "L") if img.mode != ("RGB" if self.channels == 3 else "L") else img
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), RESIZE[self.resize])
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def load(self, source: str | Path | bytes | Image.Image | np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Any image source -> (uint8 tensor at model size, original (height, width))."""
        if isinstance(source, np.ndarray):
            source = Image.fromarray(source)
        img = source if isinstance(source, Image.Image) else load_image(source, self.channels)
        return self.pil_to_uint8(img), (img.size[1], img.size[0])


class Normalize(torch.nn.Module):
    """uint8 (B, C, H, W) -> float normalised with the backbone's mean/std; the first layer of every model."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels: int = 3) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32)[:channels].view(1, -1, 1, 1) * 255.0
        std_t = torch.tensor(std, dtype=torch.float32)[:channels].view(1, -1, 1, 1) * 255.0
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("inv_std", 1.0 / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std
