"""CutPaste pretext (Li et al., CVPR 2021) for self-supervised backbones: normal vs. patch pasted elsewhere vs. scar.

Each training image is shown three times: as it is (class 0); with a rectangle cut from one place
of the same image and pasted at another, its colours slightly jittered (class 1, "cutpaste"); and
with a thin, long, rotated strip cut and pasted the same way (class 2, "scar"). Telling them apart
needs exactly what anomaly detection on textures and near-symmetric images needs: local
irregularities and broken continuity, which rotation prediction cannot teach on images that look
alike at every angle. Everything is drawn from a ``torch.Generator``: the same seed gives the same
images and labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CUTPASTE_CLASSES = 3  # normal, cutpaste, scar
CUTPASTE_CHANCE = 1.0 / CUTPASTE_CLASSES


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, max(lo, hi) + 1, (), generator=g))


def _jitter(patch: torch.Tensor, g: torch.Generator, amount: float = 0.1) -> torch.Tensor:
    """Brightness and per-channel colour jitter of a float patch in [0, 255]."""
    scale = 1.0 + _uniform(g, -amount, amount)
    shift = (torch.rand(patch.shape[0], 1, 1, generator=g) * 2 - 1) * 255.0 * amount * 0.5
    return (patch * scale + shift).clamp(0, 255)


def _box(g: torch.Generator, h: int, w: int, area: tuple[float, float], aspect: tuple[float, float]
         ) -> tuple[int, int]:
    """(height, width) of a rectangle covering ``area`` of the image with aspect ratio in ``aspect``."""
    a = _uniform(g, *area) * h * w
    ratio = math.exp(_uniform(g, math.log(aspect[0]), math.log(aspect[1])))
    bh = max(1, min(h - 1, int(round(math.sqrt(a / ratio)))))
    bw = max(1, min(w - 1, int(round(math.sqrt(a * ratio)))))
    return bh, bw


def cutpaste(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One uint8 (C, H, W) image with a rectangle of itself (2-15 % of the area) pasted elsewhere."""
    _, h, w = image.shape
    bh, bw = _box(g, h, w, (0.02, 0.15), (0.3, 3.3))
    y0, x0 = _randint(g, 0, h - bh), _randint(g, 0, w - bw)
    y1, x1 = _randint(g, 0, h - bh), _randint(g, 0, w - bw)
    out = image.float().clone()
    out[:, y1:y1 + bh, x1:x1 + bw] = _jitter(image[:, y0:y0 + bh, x0:x0 + bw].float(), g)
    return out.round().to(torch.uint8)


def scar(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One uint8 (C, H, W) image with a thin strip of itself (2-16 by 10-25 px at 256 px, scaled with
    the image), rotated by up to 45 degrees, pasted elsewhere."""
    c, h, w = image.shape
    s = min(h, w) / 256.0
    sw = max(1, int(round(_uniform(g, 2, 16) * s)))
    sl = max(2, int(round(_uniform(g, 10, 25) * s)))
    side = int(math.ceil(math.hypot(sw, sl))) + 2
    side = min(side, h, w)
    y0, x0 = _randint(g, 0, h - side), _randint(g, 0, w - side)
    y1, x1 = _randint(g, 0, h - side), _randint(g, 0, w - side)
    patch = _jitter(image[:, y0:y0 + side, x0:x0 + side].float(), g)
    angle = math.radians(_uniform(g, -45, 45))
    # The strip's mask: |along| <= sl/2 and |across| <= sw/2 in the rotated frame (centred in the patch).
    yy, xx = torch.meshgrid(torch.arange(side) - (side - 1) / 2, torch.arange(side) - (side - 1) / 2, indexing="ij")
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    mask = ((along.abs() <= sl / 2) & (across.abs() <= sw / 2)).to(patch.dtype)
    out = image.float().clone()
    region = out[:, y1:y1 + side, x1:x1 + side]
    out[:, y1:y1 + side, x1:x1 + side] = region * (1 - mask) + patch * mask
    return out.round().to(torch.uint8)


def cutpaste_batch(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) uint8 -> (3B, C, H, W): the images, their cutpaste and scar versions; labels 0, 1, 2."""
    pasted = torch.stack([cutpaste(im, g) for im in x]) if len(x) else x
    scarred = torch.stack([scar(im, g) for im in x]) if len(x) else x
    labels = torch.arange(CUTPASTE_CLASSES, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat([x, pasted.to(x.device), scarred.to(x.device)]), labels


def batch_generator(seed: int, batch: torch.Tensor) -> torch.Generator:
    """A generator fixed by the seed and the batch's content: validation batches get the same
    defects every epoch, so the validation loss is comparable across epochs."""
    key = int(batch.to(torch.int64).sum()) % (2**31)
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + key) % (2**63))


class CutPasteObjective:
    """Three-way cross-entropy (normal, cutpaste, scar); accuracy as the metric. Training draws from its
    own seeded generator; validation batches from one fixed by their content (see ``batch_generator``)."""

    inputs_are_images = True

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        g = self.generator if model.training else batch_generator(self.seed, batch.cpu())
        x, y = cutpaste_batch(batch.cpu(), g)
        x, y = x.to(batch.device), y.to(batch.device)
        logits = model(x)
        accuracy = (logits.detach().argmax(1) == y).float().mean().item()
        return F.cross_entropy(logits, y), {"accuracy": accuracy}

    def end_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        pass
