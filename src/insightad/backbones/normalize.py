"""The first layer of every model graph: the backbone's mean/std applied to 0..255 pixels."""

from __future__ import annotations

import torch


class Normalize(torch.nn.Module):
    """Pixels (B, C, H, W), uint8 or float 0..255 -> float normalised with the backbone's mean/std."""

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
