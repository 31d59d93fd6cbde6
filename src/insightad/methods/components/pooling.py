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
