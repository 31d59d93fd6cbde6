"""Global pooling of backbone levels into one image embedding (baseline, Deep SVDD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pooled_features(feats: list[torch.Tensor]) -> torch.Tensor:
    """Global average pool of each level, each L2-normalised so every level weighs the same."""
    pooled = [F.normalize(f.mean(dim=(2, 3)), dim=1) for f in feats]
    return torch.cat(pooled, dim=1)


def pooled_mean_std(feats: list[torch.Tensor]) -> torch.Tensor:
    """Per level: the channel means and the channel spatial standard deviations, each L2-normalised."""
    out = []
    for f in feats:
        flat = f.flatten(2).float()
        out.append(F.normalize(flat.mean(dim=2), dim=1))
        out.append(F.normalize(flat.std(dim=2, unbiased=False), dim=1))
    return torch.cat(out, dim=1)


def pooled_mean_std_max(feats: list[torch.Tensor]) -> torch.Tensor:
    """Per level: channel means, spatial standard deviations and spatial maxima, each L2-normalised.

    The mean alone dilutes a thin, local defect (a crack covers a few percent of the image); the
    spread and the maximum of each channel keep it visible in a global embedding."""
    out = []
    for f in feats:
        flat = f.flatten(2).float()
        out.append(F.normalize(flat.mean(dim=2), dim=1))
        out.append(F.normalize(flat.std(dim=2, unbiased=False), dim=1))
        out.append(F.normalize(flat.amax(dim=2), dim=1))
    return torch.cat(out, dim=1)


POOLINGS = {"mean": pooled_features, "mean_std": pooled_mean_std, "mean_std_max": pooled_mean_std_max}


def pool(feats: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Backbone levels -> one embedding per image with the named pooling (see ``POOLINGS``)."""
    return POOLINGS[kind](feats)
