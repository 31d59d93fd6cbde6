"""Self-supervised backbone: CutPaste (the default) or rotation prediction (the first seed's SSL step) on
unlabelled images.

``--pretext cutpaste`` (see :mod:`insightad.backbones.ssl_cutpaste`) classifies normal vs. a patch pasted
elsewhere vs. a scar: it stays learnable on textures and near-symmetric images, where rotation cannot be
seen, and it is what raised SVDD and PaDiM on crack (docs/ssl.md). ``--pretext rotation`` shows every
training image at 0, 90, 180 and 270 degrees and a 4-way head learns which; it needs the orientation of
edges and shapes, and on rotation-symmetric images (many textures) its accuracy stays near chance (0.25):
the trainer then warns instead of silently producing a useless backbone.

Either way a linear head on the pooled deepest feature map learns the pretext classes (cross-entropy),
starting from the ImageNet weights by default. The result is a *backbone file* (not a detector):
safetensors with the backbone's weights in timm names and ``insightad_backbone`` metadata, usable by
every method as ``--backbone ssl:PATH``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from insightad import config
from insightad.backbones import build_extractor
from insightad.backbones.normalize import Normalize
from insightad.backbones.registry import BACKBONE_META_KEY
from insightad.backbones.ssl_cutpaste import CUTPASTE_CHANCE, CUTPASTE_CLASSES, CutPasteObjective, cutpaste_batch
from insightad.config import DEFAULT_BACKBONE, MAX_IMAGE_SIDE, TrainLoopParams, param, params
from insightad.data.loader import ImageSource
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError
from insightad.runtime import THP_ENV, available_memory, huge_pages_missed, on_gpu
from insightad.training import TrainingLoop, TrainResult, data_fingerprint, fingerprint, load_images, validation_split
from insightad.training.augment import Augment
from insightad.training.recompute import recomputed_activations
from insightad.version import __version__

if TYPE_CHECKING:
    from timm.models import FeatureInfo

ROTATIONS = 4
CHANCE = 1.0 / ROTATIONS
BACKBONE_FORMAT = "insightad-backbone"



SSL_INITS = ("imagenet", "random")
PRETEXTS = ("rotation", "cutpaste")

@params
class SSLParams(TrainLoopParams):
    """Self-supervised fine-tuning of a backbone on unlabelled images (writes a backbone file)."""

    backbone: str = param(DEFAULT_BACKBONE, "architecture to train (a timm name, or ssl:PATH to continue "
                          "from an earlier backbone file)")
    pretext: str = param("cutpaste", "cutpaste: normal vs. patch pasted elsewhere vs. scar (learnable on "
                         "textures and near-symmetric images; raised SVDD and PaDiM on crack, docs/ssl.md); "
                         "rotation: predict 0/90/180/270 degrees (the first seed's task; needs oriented images)",
                         choices=PRETEXTS)
    init: str = param("imagenet", "start from the backbone's ImageNet weights or from random weights",
                      choices=SSL_INITS)
    weights: str | None = param(None, "with --init imagenet: a .safetensors/.pth file to start from "
                                "instead of the installed ImageNet weights")
    image_size: int = param(256, "side of the square image the backbone trains at (the detectors' default working "
                            "size)", minimum=16, maximum=MAX_IMAGE_SIDE)
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    epochs: int = param(5, "training epochs (each image is seen in every pretext class per epoch: 3 versions for "
                        "cutpaste, 4 rotations)", minimum=1, aliases=("--epoch",))
    min_accuracy: float = param(0.4, "rotation: warn when the best rotation accuracy stays below this (chance "
                                "is 0.25)", minimum=0.0, maximum=1.0)
    recompute_activations: bool = param(True, "keep only each backbone block's input and recompute its "
                                        "activations in the backward pass: about half the memory (CutPaste at "
                                        "256 px, batch 32: 11.1 -> 5.1-5.3 GB peak), one more forward pass per step; the "
                                        "same training otherwise")
    freeze_levels: int = param(0, "keep the backbone's first N feature levels (and everything before them) at "
                               "their starting weights and batch-norm statistics; only the deeper part trains: "
                               "no backward pass through the largest activations (2 on crack: about half the time, "
                               "3.2 instead of 5.1 GB, SVDD 0.990 instead of 0.994; docs/ssl.md)",
                               minimum=0)
    time_budget: float = param(900.0, "seconds of training after which it stops (after the current step; the "
                               "best weights so far are kept; 0: no budget). The default 5 epochs at 256 px take "
                               "about 8 minutes on a 2-core CPU (docs/ssl.md)", minimum=0.0)

class RotationUnlearnableWarning(UserWarning):
    """The rotation task stayed near chance: the backbone learned little from these images."""


class MemoryShortWarning(UserWarning):
    """A fine-tune on the CPU likely to need more memory than the machine has available."""


class SlowerWarning(UserWarning):
    """A fine-tune on the CPU that runs slower than it could, and how to have it faster."""


def peak_estimate(p: SSLParams) -> int:
    """About the peak memory (bytes) of a fine-tune on the CPU, from the runs measured with tf_efficientnet_lite0
    at 256 px (docs/ssl.md): 1 GB for the process and its images, plus per image version in a batch (3 per image
    for CutPaste, 4 for rotation) 44 MB with every level training and activations recomputed, 24 MB with
    --freeze-levels, 2.2 times as much without recomputation; scaled with the image's area. A larger backbone
    needs more."""
    versions = p.batch_size * (ROTATIONS if p.pretext == "rotation" else CUTPASTE_CLASSES)
    per_version = (24.0 if p.freeze_levels else 44.0) * (1.0 if p.recompute_activations else 2.2)
    return int((1024 + versions * per_version * (p.image_size / 256) ** 2) * 2**20)


def warn_if_short_of_memory(p: SSLParams) -> None:
    """Say before the fine-tune starts (not when the kernel kills it minutes in) that memory looks short."""
    need, have = peak_estimate(p), available_memory()
    if have is not None and need > have:
        warnings.warn(f"ssl: this fine-tune needs about {need / 2**30:.1f} GB on the CPU (batch {p.batch_size} at "
                      f"{p.image_size} px) and {have / 2**30:.1f} GB are available: it may be killed before it ends; "
                      "lower --batch-size or --image-size, or use --freeze-levels 2 (docs/ssl.md; under train "
                      "--backbone ssl, --batch-size is the detector's and --freeze-levels is not taken: run train "
                      "--method ssl with them first, then --backbone ssl:FILE)",
                      MemoryShortWarning, stacklevel=3)


def warn_if_without_huge_pages() -> None:
    """A Python program that imported PyTorch without its huge pages gets a fine-tune a third slower than
    ``insightad train``'s (docs/ssl.md): say how to have them."""
    if huge_pages_missed():
        warnings.warn(f"ssl: PyTorch was imported without {THP_ENV}=1, so this fine-tune runs about 1.4x slower on "
                      f"the CPU than it could; set {THP_ENV}=1 in the environment before importing torch "
                      "(insightad train does; docs/ssl.md)", SlowerWarning, stacklevel=3)


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) square images -> (4B, C, H, W) at 0/90/180/270 degrees and their labels 0..3."""
    if x.shape[-1] != x.shape[-2]:
        raise InsightADError(f"ssl: rotation needs square images, got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


class PretextNet(nn.Module):
    """uint8 images -> pretext logits (B, classes): normalisation, the backbone body, pooled deepest level,
    linear head (4 rotations, or the 3 CutPaste classes)."""

    def __init__(self, normalize: Normalize, body: nn.Module, channels: int, classes: int = ROTATIONS,
                 frozen: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.normalize, self.body = normalize, body
        self.head = nn.Linear(channels, classes)
        self._frozen = list(frozen)  # a plain list: not registered twice (they are the body's)
        for m in self._frozen:
            m.requires_grad_(False)

    def train(self, mode: bool = True) -> PretextNet:
        """As ``nn.Module.train``, but the frozen modules stay in eval mode (their batch-norm statistics fixed)."""
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deepest = self.body(self.normalize(x))[-1]
        return self.head(deepest.mean(dim=(2, 3)))


class RotationObjective:
    """Cross-entropy of the rotation of every image at all four rotations; accuracy as the metric."""

    inputs_are_images = True

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = rotate_batch(batch)
        logits = model(x)
        accuracy = (logits.detach().argmax(1) == y).float().mean().item()
        return F.cross_entropy(logits, y), {"accuracy": accuracy}

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        pass


def modules_through(body: nn.Module, last: str) -> list[nn.Module]:
    """The modules of ``body`` holding their own weights or statistics, registered before or inside its
    submodule ``last`` (timm's feature bodies register their modules in the order they run): what
    ``--freeze-levels`` keeps fixed."""
    out: list[nn.Module] = []
    inside = False
    for name, m in body.named_modules():
        if name == last or name.startswith(last + "."):
            inside = True
        elif inside:
            break
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            out.append(m)
    return out


def level_count(arch: str) -> int:
    """How many feature levels timm's features_only model of ``arch`` has."""
    import timm

    return len(cast("FeatureInfo", timm.create_model(arch, pretrained=False, features_only=True).feature_info))


class SSLTrainer:
    """Trains a backbone on its pretext task (CutPaste or rotation); ``save`` writes the backbone file.

    ``insightad train`` switches PyTorch's huge-page allocation on for this (a third faster on the CPU,
    ``runtime.huge_pages_for_tensors``); a Python program gets the same by setting ``THP_MEM_ALLOC_ENABLE=1``
    before it imports torch."""

    method = "ssl"
    Params = SSLParams

    def __init__(self, **params: Any) -> None:
        p = config.build(self.Params, params, where=self.method)
        if p.init == "random" and p.weights:
            raise InsightADError("weights: only used with --init imagenet (got --init random)")
        if p.init == "random" and p.freeze_levels:
            raise InsightADError("freeze_levels: only with --init imagenet (got --init random: levels frozen at "
                                 "random weights would stay random); use --freeze-levels 0")
        self.params = p

    def get_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    def fit(self, images: Sequence[ImageSource], progress: bool = False, augment: Augment | None = None
            ) -> SSLTrainer:
        """Train on ``images`` (normal or unlabelled); a held-out ``val_fraction`` measures rotation accuracy."""
        p = self.params
        if len(images) == 0:
            raise InsightADError("ssl: no training images given")
        if augment is None and p.augment == "affine":  # rotation is this task's label: never augment with it
            from insightad.training.augment import get_augmentation

            augment = get_augmentation("affine-norotate")
        chance = CHANCE if p.pretext == "rotation" else CUTPASTE_CHANCE
        loop = TrainingLoop(p, name="ssl", progress=progress, augment=augment,
                            fingerprint=fingerprint(p, **data_fingerprint(images)),
                            curve_metrics={"accuracy": chance})
        torch.manual_seed(p.seed)
        pretrained = p.init == "imagenet"
        if not on_gpu(p.device):
            warn_if_short_of_memory(p)
            warn_if_without_huge_pages()
        probe_spec_arch = _arch_of(p.backbone)
        levels = list(range(level_count(probe_spec_arch)))
        extractor, spec, source = build_extractor(p.backbone, levels, p.weights, pretrained=pretrained)
        self.spec_, self.weights_source_ = spec, (source if pretrained else "random")
        self.preprocessing_ = Preprocessing(size=(p.image_size, p.image_size), channels=3,
                                            mean=tuple(spec.mean), std=tuple(spec.std))
        extractor.requires_grad_(True)
        norm = Normalize(spec.mean, spec.std, 3)
        classes = ROTATIONS if p.pretext == "rotation" else CUTPASTE_CLASSES
        frozen: list[nn.Module] = []
        if p.freeze_levels:
            names = extractor.module_names
            if p.freeze_levels >= len(names):
                raise InsightADError(f"freeze_levels: {p.backbone} has {len(names)} feature levels; at most "
                                     f"{len(names) - 1} can be frozen (got {p.freeze_levels})")
            frozen = modules_through(extractor.body, names[p.freeze_levels - 1])
        net = PretextNet(norm, extractor.body, extractor.channels[-1], classes, frozen)
        data = load_images(images, self.preprocessing_, p.batch_size, p.workers, progress, "ssl: load images")
        tr, va = validation_split(len(images), p.val_fraction, p.seed)
        objective = RotationObjective() if p.pretext == "rotation" else CutPasteObjective(p.seed)
        with recomputed_activations(net.body, p.recompute_activations):
            self.result_: TrainResult = loop.run(net, objective, data[tr], data[va] if len(va) else None)
        self.body_ = net.body.cpu().eval()
        self.n_train_, self.n_val_ = int(len(tr)), int(len(va))
        best = self.result_.best()
        self.heldout_ = self.n_val_ > 0
        self.accuracy_ = float(best["val_accuracy"] if self.heldout_ else self._accuracy(net.cpu(), data[tr]))
        self.warning_ = None
        if p.pretext == "rotation" and self.accuracy_ < p.min_accuracy:
            self.warning_ = (f"ssl: rotation accuracy stayed near chance ({self.accuracy_:.2f}, chance {CHANCE:.2f}, "
                             f"warning below {p.min_accuracy:g}): these images look alike at every rotation "
                             "(e.g. rotation-symmetric textures), so the backbone learned little from them; "
                             "prefer the ImageNet backbone for these images, or train longer / on images "
                             "with a clear orientation")
            warnings.warn(self.warning_, RotationUnlearnableWarning, stacklevel=2)
        return self

    @torch.no_grad()
    def _accuracy(self, net: PretextNet, data: torch.Tensor) -> float:
        net.eval()
        correct, total = 0, 0
        for chunk in data.split(self.params.batch_size):
            if self.params.pretext == "rotation":
                x, y = rotate_batch(chunk)
            else:
                from insightad.backbones.ssl_cutpaste import batch_generator

                x, y = cutpaste_batch(chunk, batch_generator(self.params.seed, chunk))
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
        return correct / max(1, total)

    def metadata(self, split: dict[str, Any] | None = None) -> dict[str, Any]:
        """The backbone file's ``insightad_backbone`` JSON."""
        p, spec = self.params, self.spec_
        r = self.result_
        return {
            "format": BACKBONE_FORMAT, "format_version": 1, "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "arch": spec.arch, "input_size": p.image_size, "mean": list(spec.mean), "std": list(spec.std),
            "method": "ssl", "pretext": p.pretext, "init": p.init, "init_weights": self.weights_source_,
            "params": self.get_params(),
            "pretext_accuracy": {"value": self.accuracy_, "heldout": self.heldout_,
                                 "chance": CHANCE if p.pretext == "rotation" else CUTPASTE_CHANCE,
                                 "n_images": self.n_val_ if self.heldout_ else self.n_train_},
            **({"rotation_accuracy": {"value": self.accuracy_, "heldout": self.heldout_, "chance": CHANCE,
                                      "n_images": self.n_val_ if self.heldout_ else self.n_train_}}
               if p.pretext == "rotation" else {}),
            "warning": self.warning_,
            "training": {**r.summary(), "n_train": self.n_train_, "n_val": self.n_val_},
            "split": split,
        }

    def save(self, path: str | Path, split: dict[str, Any] | None = None) -> Path:
        """Write the backbone file atomically (weights in timm names + metadata); returns its path."""
        from safetensors.torch import save_file

        from insightad.io import atomic_write

        if not hasattr(self, "body_"):
            raise InsightADError("ssl: nothing to save yet (call fit first)")
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.body_.state_dict().items()}
        meta = {BACKBONE_META_KEY: json.dumps(self.metadata(split))}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path


def _arch_of(backbone: str) -> str:
    from insightad.backbones import get_spec

    return get_spec(backbone).arch
