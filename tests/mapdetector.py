"""A tiny test-only Detector with maps: per-pixel deviation from the mean training image.

It follows the Detector contract like any method (pure-tensor model, threshold set in fit, restore
from a model file), so the map paths (overlays, pixel thresholds, worst-case sheets) are tested
without depending on any real map method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from insightad.config import DetectorParams
from insightad.data.preprocess import Preprocessing
from insightad.methods import register_method
from insightad.methods.base import Detector

NAME = "meandev"


class MeanDeviationModel(nn.Module):
    """uint8 images -> (max of the map, map): mean absolute deviation from the mean image, smoothed."""

    def __init__(self, mean_image: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean_image", mean_image)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = (x.float() / 255.0 - self.mean_image).abs().mean(1, keepdim=True)
        d = F.avg_pool2d(d, 5, 1, 2)[:, 0]
        return d.flatten(1).amax(1), d


class MeanDeviationDetector(DetectorParams, Detector):
    has_maps = True
    uses_backbone = False

    def _fit(self, images: Sequence, progress: bool) -> None:
        self.preprocessing_ = Preprocessing(size=(self.image_size, self.image_size), channels=3)
        stack = torch.cat([b.images.float() / 255.0 for b in self._batches(images, progress, NAME)])
        self.model_ = MeanDeviationModel(stack.mean(0)).to(self.device_)
        with torch.inference_mode():
            train = self.model_((stack * 255).round().to(torch.uint8))[0].numpy()
        self.decision_scores_, self.decision_source_ = train, "train"

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        return MeanDeviationModel(torch.empty_like(tensors["mean_image"]))


def register_meandev() -> str:
    register_method(NAME)(MeanDeviationDetector)
    return NAME


try:
    import pytest
except ImportError:  # imported by a subprocess without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def map_model(mvtec_dir, tmp_path):
        """A fresh meandev model file trained on the synthetic MVTec set (cheap: no backbone)."""
        from insightad.apps.train import train_model
        from insightad.config import DataParams

        register_meandev()
        out = tmp_path / "meandev.safetensors"
        train_model(mvtec_dir, NAME, {"image_size": 64}, DataParams(), out, progress=False)
        return out
