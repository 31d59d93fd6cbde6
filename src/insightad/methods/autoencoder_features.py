"""Feature-level reconstruction: a small autoencoder rebuilds the frozen backbone's multi-level patch
features of normal images; the per-patch reconstruction error is the anomaly map.

Reconstructing pixels asks a network to redraw every highlight and rim of the product, and it
learns to redraw defects along with them; ImageNet features already say *what* a patch is, so a
network that can only rebuild the features of normal patches (1x1 convolutions through a narrow
latent: each patch on its own, no room to copy an unseen pattern) fails exactly where the patch is
unlike anything normal. Training runs on features computed once (seconds per epoch on a CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from insightad.methods.components.maps import MapSmoother, top_mean
from insightad.methods.components.patch_features import PatchFeatures


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True))


class FeatureReconstructor(nn.Module):
    """1x1-convolution autoencoder on (B, C, h, w) features: C -> (C+latent)/2 -> latent -> back to C."""

    def __init__(self, channels: int, latent: int) -> None:
        super().__init__()
        mid = (channels + latent) // 2
        self.encoder = nn.Sequential(_block(channels, mid), _block(mid, latent))
        self.decoder = nn.Sequential(_block(latent, mid), nn.Conv2d(mid, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def reconstruction_error(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Mean squared error over channels, per patch: (B, C, h, w) -> (B, h, w)."""
    return ((net(features) - features) ** 2).mean(dim=1)


class FeatureAutoencoderModel(nn.Module):
    """uint8 images -> (scores, maps): standardised patch features, their reconstruction error per
    patch, smoothed and brought to model size; score = its maximum or mean."""

    def __init__(self, features: PatchFeatures, net: FeatureReconstructor, score: str, sigma: float,
                 image_size: int, grid_size: int) -> None:
        super().__init__()
        self.features, self.net, self.score = features, net, score
        self.smoother = MapSmoother(sigma, image_size, grid_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.smoother(reconstruction_error(self.net, self.features(images)))
        scores = top_mean(maps, 0.0 if self.score == "max" else 1.0)
        return scores, maps


class FeatureReconstructionObjective:
    """The loop's objective: mean squared reconstruction error of standardised features. Inputs are the
    cached features, or uint8 images (augmentation) whose features are computed on the fly."""

    def __init__(self, features: PatchFeatures | None) -> None:
        self.features = features
        self.inputs_are_images = features is not None

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch
        if self.features is not None:
            with torch.no_grad():
                x = self.features(batch)
        return reconstruction_error(model, x).mean(), {}

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        pass
