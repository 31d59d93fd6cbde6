"""Convolutional autoencoders (pure tensors): the second seed's network and a narrower default.

The seed's encoder (four stride-2 convolutions, 32-64-128-256 channels) keeps a 256 x H/16 x W/16
latent: as many numbers as a grayscale input, so it can learn to copy defects as well as normal
structure. The default ``bottleneck`` network squeezes the image through a small latent
(``latent`` channels at 1/16 of the input side, 8x fewer numbers than a colour input), which forces
it to reconstruct only what normal images share; defects then come back as reconstruction error.
"""

from __future__ import annotations

from torch import nn


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Conv4Autoencoder(nn.Module):
    """A plain autoencoder (the second seed's network): 4 stride-2 convs (32, 64, 128, 256) + BN + ReLU, mirrored by
    4 transposed convs, sigmoid output. Input side must be a multiple of 16."""

    stride = 16

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_down(channels, 32), _down(32, 64), _down(64, 128), _down(128, 256))
        self.decoder = nn.Sequential(_up(256, 128), _up(128, 64), _up(64, 32),
                                     nn.ConvTranspose2d(32, channels, 3, stride=2, padding=1, output_padding=1),
                                     nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


class BottleneckAutoencoder(nn.Module):
    """Four stride-2 stages (32..256 channels), a linear 1x1 squeeze to ``latent`` channels at 1/16 of
    the side (no ReLU there: a rectified latent can die and leave a constant output), and the mirror
    image back up; sigmoid output. Input side must be a multiple of 16."""

    stride = 16

    def __init__(self, channels: int = 3, latent: int = 32, width: int = 32) -> None:
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.encoder = nn.Sequential(_down(channels, w[0]), _down(w[0], w[1]), _down(w[1], w[2]),
                                     _down(w[2], w[3]), nn.Conv2d(w[3], latent, 1), nn.BatchNorm2d(latent))
        self.decoder = nn.Sequential(nn.Conv2d(latent, w[3], 1, bias=False), nn.BatchNorm2d(w[3]), nn.ReLU(inplace=True),
                                     _up(w[3], w[2]), _up(w[2], w[1]), _up(w[1], w[0]),
                                     nn.ConvTranspose2d(w[0], channels, 3, stride=2, padding=1, output_padding=1),
                                     nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


def build_net(arch: str, channels: int, latent: int) -> nn.Module:
    if arch == "conv4":
        return Conv4Autoencoder(channels)
    return BottleneckAutoencoder(channels, latent)
