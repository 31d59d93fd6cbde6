"""Autoencoders: learn to reconstruct normal data; reconstruction error is the anomaly map.

Two kinds, one detector, trained by the shared training loop (checkpoints, resume, early stopping,
time budget, augment):

- ``--arch features`` (default): a 1x1-convolution autoencoder rebuilds the frozen backbone's
  multi-level patch features (see :mod:`insightad.methods.autoencoder_features`); the map is the
  per-patch feature reconstruction error.
- ``--arch conv4`` (the second seed's network, alias ``seed``) and ``--arch bottleneck``: pixel
  autoencoders with the seed's loss, (1 - alpha) * MSE + alpha * (1 - SSIM), alpha = 0.84, with
  kornia's SSIM; the map is the per-pixel error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from insightad import config
from insightad.backbones.extractor import FeatureExtractor
from insightad.config import MAX_IMAGE_SIDE, TrainLoopParams, param, params
from insightad.errors import InsightADError
from insightad.methods.autoencoder_features import (
    FeatureAutoencoderModel,
    FeatureReconstructionObjective,
    FeatureReconstructor,
    reconstruction_error,
)
from insightad.methods.autoencoder_nets import build_net
from insightad.methods.base import Detector
from insightad.methods.components.maps import MapSmoother, top_mean
from insightad.methods.components.patch_features import PatchFeatures
from insightad.methods.registry import register_method
from insightad.training import TrainingLoop

AE_ARCHS = ("features", "bottleneck", "conv4")
PIXEL_ARCHS = ("bottleneck", "conv4")
AE_ARCH_ALIASES = {"seed": "conv4"}  # the name the second seed's network had before; hidden alias

@params
class AutoencoderParams(TrainLoopParams):
    """Convolutional autoencoder: (1 - alpha) * MSE + alpha * (1 - SSIM); reconstruction error is the map."""

    arch: str = param("features", "network: features (rebuild the frozen backbone's patch features; error per "
                      "patch), bottleneck (pixels through a narrow latent that cannot copy defects) or conv4 "
                      "(the second seed's pixel autoencoder of four stride-2 convolutions, grayscale by default)",
                      choices=AE_ARCHS, value_aliases=AE_ARCH_ALIASES)
    backbone: str = param(config.DEFAULT_BACKBONE, "--arch features: the frozen backbone (a name, ssl:PATH, or ssl "
                          "to fine-tune one first)")
    weights: str | None = param(None, "--arch features: backbone weights file (unset: the installed ones)")
    layers: list[int] = param([1, 2, 3], "--arch features: backbone levels to reconstruct (0 = finest); they are "
                              "brought to the grid of the middle one")
    fit_engine: str = param("auto", "--arch features: engine for the frozen backbone during fit",
                            choices=("auto", "torch", "onnx"))
    channels: int = param(0, "pixel networks: 1 (grayscale) or 3 (colour); 0: colour when the images are, "
                          "grayscale for --arch conv4", minimum=0, maximum=3)
    latent: int = param(0, "channels of the latent (features: per patch; bottleneck: at 1/16 of the image side); "
                        "0: 64 for features, 32 for bottleneck", minimum=0)
    image_size: int = param(256, "side of the square image the model works at (pixel networks: a multiple of 16)",
                            minimum=32, maximum=MAX_IMAGE_SIDE)
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    alpha: float = param(0.84, "pixel networks: weight of (1 - SSIM) in the loss", minimum=0.0, maximum=1.0)
    ssim_window: int = param(11, "pixel networks: SSIM window size (odd)", minimum=3)
    map: str = param("mse", "pixel networks: anomaly map: per-pixel squared error (mse) or 1 - local SSIM (ssim)",
                     choices=("mse", "ssim"))
    score: str = param("max", "image score: the maximum or the mean of the smoothed map", choices=("max", "mean"))
    smooth_sigma: float = param(4.0, "Gaussian smoothing of the map, in pixels at the model's size (0: none)",
                                minimum=0.0)
    epochs: int = param(100, "training epochs at most (--time-budget usually ends training first on a CPU)",
                        minimum=1, aliases=("--epoch",))
    time_budget: float = param(600.0, "seconds of training after which it stops (after the current step; the "
                               "best weights so far are kept, early stopping still applies; 0: no budget)",
                               minimum=0.0)
    lr: float = param(1e-3, "learning rate", minimum=0.0, maximum=10.0, exclusive_min=True,
                      aliases=("--learning-rate", "--learning_rate"))
    batch_size: int = param(16, "images per batch", minimum=1, aliases=("--batch_size",))
    patience: int = param(10, "early stopping: stop after this many epochs without improvement of the "
                          "validation loss (0: never stop early)", minimum=0)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of the validation (else "
                                        "training) scores", minimum=0.0, maximum=100.0)

def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """Local SSIM per pixel and channel (kornia), values in [-1, 1]; images in [0, 1]."""
    import kornia

    return kornia.metrics.ssim(a, b, window, max_val=1.0)


def loss_terms(x: torch.Tensor, recon: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE, mean SSIM) of a reconstruction."""
    return torch.mean((recon - x) ** 2), ssim_map(recon, x, window).mean()


class AutoencoderModel(nn.Module):
    """uint8 images -> (scores, maps): reconstruction error per pixel, smoothed; score = its max or mean."""

    def __init__(self, net: nn.Module, map_kind: str, score: str, sigma: float, window: int,
                 image_size: int) -> None:
        super().__init__()
        self.net, self.map_kind, self.score, self.window = net, map_kind, score, window
        self.smoother = MapSmoother(sigma, image_size, image_size)  # the map is already at model size

    def error_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel error at model size (B, 1, H, W), before smoothing."""
        recon = self.net(x)
        if self.map_kind == "ssim":
            return (1.0 - ssim_map(recon, x, self.window)).mean(dim=1, keepdim=True)
        return ((recon - x) ** 2).mean(dim=1, keepdim=True)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 255.0
        maps = self.smoother(self.error_map(x)[:, 0])
        scores = top_mean(maps, 0.0 if self.score == "max" else 1.0)
        return scores, maps


class ReconstructionObjective:
    """The loop's objective: reconstruction loss on uint8 image batches (augmentation applies)."""

    inputs_are_images = True

    def __init__(self, alpha: float, window: int) -> None:
        self.alpha, self.window = alpha, window

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch.float() / 255.0
        mse, ssim = loss_terms(x, model(x), self.window)
        loss = (1.0 - self.alpha) * mse + self.alpha * (1.0 - ssim)
        return loss, {"mse": float(mse.detach()), "ssim": float(ssim.detach())}

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        pass


def detect_channels(images: Sequence) -> int:
    """3 when any of the first training images is in colour, else 1."""
    from insightad.data.images import load_image
    from insightad.data.layouts import Sample

    for src in list(images)[:8]:
        src = src.path if isinstance(src, Sample) else src
        img = src if hasattr(src, "mode") else (load_image(src) if not isinstance(src, np.ndarray) else None)
        if img is None:
            if isinstance(src, np.ndarray) and src.ndim == 3 and src.shape[2] == 3 and not (src[..., 0] == src[..., 1]).all():
                return 3
            continue
        if img.mode == "RGB":
            arr = np.asarray(img)
            if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()):
                return 3
    return 1


@register_method("autoencoder")
class AutoencoderDetector(AutoencoderParams, Detector):
    """Pixel-level detector by reconstruction error (higher = more anomalous)."""

    Params = AutoencoderParams
    has_maps = True

    @property
    def uses_backbone(self) -> bool:  # type: ignore[override]  # per --arch, not per class
        return self.arch == "features"

    def feature_layers(self) -> list[int]:
        return list(self.layers)

    def _latent(self) -> int:
        return self.latent or (64 if self.arch == "features" else 32)

    def _stride(self) -> int:
        return 16

    def _channels(self, images: Sequence) -> int:
        if self.channels:
            return self.channels
        return 1 if self.arch == "conv4" else detect_channels(images)

    def _loop(self, images: Sequence, progress: bool, **extra: Any) -> TrainingLoop:
        from insightad.training import TrainingLoop, data_fingerprint, fingerprint

        loop_params = config.build(config.TrainLoopParams, {k: getattr(self, k) for k in
                                                           config.TrainLoopParams.__dataclass_fields__})
        return TrainingLoop(loop_params, name="autoencoder", progress=progress,
                            fingerprint=fingerprint(self.Params(**self.get_params()), **data_fingerprint(images),
                                                    **extra))

    def _fit(self, images: Sequence, progress: bool) -> None:
        if self.arch == "features":
            self._fit_features(images, progress)
            return
        from insightad.data.preprocess import Preprocessing
        from insightad.training import load_images, validation_split

        if self.image_size % self._stride():
            raise InsightADError(f"image_size: the {self.arch} autoencoder needs a multiple of {self._stride()}, "
                                 f"got {self.image_size}")
        channels = self._channels(images)
        self.preprocessing_ = Preprocessing(size=(self.image_size, self.image_size), channels=channels,
                                            mean=(0.0,) * channels, std=(1.0,) * channels)
        loop = self._loop(images, progress, channels=channels)
        data = load_images(images, self.preprocessing_, self.batch_size, self.workers, progress,
                           "autoencoder: load images")
        tr, va = validation_split(len(data), self.val_fraction, self.seed)
        train, val = data[tr], (data[va] if len(va) else None)
        net = build_net(self.arch, channels, self._latent())
        self.training_ = loop.run(net, ReconstructionObjective(self.alpha, self.ssim_window), train, val)
        self.model_ = AutoencoderModel(net, self.map, self.score, self.smooth_sigma, self.ssim_window,
                                       self.image_size).to(self.device_).eval()
        held = val is not None
        self.decision_scores_ = self._scores(val if val is not None else train)
        self.decision_source_ = "val" if held else "train"

    # ------------------------------------------------------------------ feature reconstruction
    def _patch_features(self, extractor: FeatureExtractor) -> PatchFeatures:
        grid = len(self.layers) // 2  # the middle level's grid: finer ones pooled, coarser ones upsampled
        return PatchFeatures(self._normalize(), extractor, grid, sum(extractor.channels))

    def _fit_features(self, images: Sequence, progress: bool) -> None:
        from insightad.training import load_images, validation_split

        loop = self._loop(images, progress)
        extractor = self._make_extractor()
        features = self._patch_features(extractor).to(self.device_)
        tr, va = validation_split(len(images), self.val_fraction, self.seed)
        run = self._feature_runner(extractor)
        raw = []
        with torch.inference_mode():
            for batch in self._batches(images, progress, "autoencoder: features"):
                raw.append(features.raw(run(batch.images)).float().cpu())
        cached = torch.cat(raw)
        features.fit_statistics(cached[tr])
        on_images = self.augment != "none"
        if on_images:  # augmented images change every epoch: their features are computed on the fly
            data = load_images(images, self.preprocessing_, self.batch_size, self.workers, progress,
                               "autoencoder: load images")
        else:
            data = features.standardize(cached.to(self.device_)).cpu()
        del cached, raw
        train, val = data[tr], (data[va] if len(va) else None)
        net = FeatureReconstructor(sum(extractor.channels), self._latent())
        objective = FeatureReconstructionObjective(features if on_images else None)
        self.training_ = loop.run(net, objective, train, val)
        self.model_ = self._feature_model(features, net).to(self.device_).eval()
        held = val is not None
        self.decision_scores_ = self._feature_scores(val if val is not None else train, on_images)
        self.decision_source_ = "val" if held else "train"

    def _feature_model(self, features: PatchFeatures, net: FeatureReconstructor) -> FeatureAutoencoderModel:
        with torch.inference_mode():  # the side of the patch grid at this image size
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=features.mean.device)
            side = int(features.raw(features.extractor(probe)).shape[-1])
        return FeatureAutoencoderModel(features, net, self.score, self.smooth_sigma, self.image_size, side)

    @torch.inference_mode()
    def _feature_scores(self, data: torch.Tensor, on_images: bool) -> np.ndarray:
        model = self._model_as(FeatureAutoencoderModel)
        out = []
        for chunk in data.split(self.batch_size):
            chunk = chunk.to(self.device_)
            if on_images:
                out.append(model(chunk)[0].cpu())
                continue
            maps = model.smoother(reconstruction_error(model.net, chunk))
            out.append(top_mean(maps, 0.0 if model.score == "max" else 1.0).cpu())
        return torch.cat(out).double().numpy()

    @torch.inference_mode()
    def _scores(self, data: torch.Tensor) -> np.ndarray:
        return torch.cat([self.forward_tensor(chunk)[0].float().cpu() for chunk in data.split(self.batch_size)]).double().numpy()

    def state_metadata(self) -> dict[str, Any]:
        t = getattr(self, "training_", None)
        return {"channels": self.preprocessing_.channels, "training": t.summary() if t else None}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        if self.arch == "features":
            extractor = self._make_extractor(pretrained=False)
            features = self._patch_features(extractor)
            latent = int(tensors["net.encoder.1.0.weight"].shape[0]) if "net.encoder.1.0.weight" in tensors \
                else self._latent()
            return self._feature_model(features, FeatureReconstructor(sum(extractor.channels), latent))
        channels = self.preprocessing_.channels
        latent = self._latent()
        for k, v in tensors.items():  # the latent width is read off the tensors
            if self.arch == "bottleneck" and k == "net.encoder.4.weight":
                latent = v.shape[0]
        return AutoencoderModel(build_net(self.arch, channels, latent), self.map, self.score, self.smooth_sigma,
                                self.ssim_window, self.image_size)
