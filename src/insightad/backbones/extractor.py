"""Frozen multi-layer feature extraction shared by every method (timm ``features_only``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from insightad.backbones.registry import BACKBONES, BackboneSpec, get_spec
from insightad.backbones.weights import resolve_weights
from insightad.errors import InsightADError

if TYPE_CHECKING:
    from timm.models import FeatureInfo


class FeatureExtractor(nn.Module):
    """Normalised float images -> feature maps of the requested levels (finest first).

    Blocks past the deepest requested level are dropped, so asking for middle layers costs
    only the forward pass up to them.
    """

    def __init__(self, arch: str, layers: Sequence[int], in_chans: int = 3) -> None:
        super().__init__()
        import timm

        self.arch, self.layers = arch, tuple(int(i) for i in layers)
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise InsightADError(f"layers: expected distinct levels counted from 0 (the finest), got {list(layers)}")
        try:
            self.body = timm.create_model(arch, pretrained=False, features_only=True,
                                          out_indices=self.layers, in_chans=in_chans)
        except (IndexError, AssertionError, ValueError):
            try:
                full: Any = timm.create_model(arch, pretrained=False, features_only=True)
                levels = len(full.feature_info)
                have = f"levels 0-{levels - 1} (0 = finest)"
            except Exception:  # noqa: BLE001 - an architecture timm cannot build at all says so itself below
                have = "other levels"
            raise InsightADError(f"layers: {list(layers)} not available for {arch}: it has {have}") from None
        self._truncate()
        info = cast("FeatureInfo", self.body.feature_info)
        self.channels = list(info.channels())
        self.reductions = list(info.reduction())
        self.module_names = list(info.module_name())  # the body's submodule that ends each requested level

    def _truncate(self) -> None:
        body = self.body
        stages = getattr(body, "_stage_out_idx", None)
        if stages and hasattr(body, "blocks"):  # timm EfficientNetFeatures: stage s ends at block s-1
            body.blocks = cast(nn.Sequential, body.blocks)[: max(stages)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))

    def load_weights(self, full_sd: dict[str, torch.Tensor], origin: str) -> None:
        """Strict load: every tensor of this extractor must come from ``full_sd`` with its exact shape."""
        own = self.body.state_dict()
        missing = [k for k in own if k not in full_sd]
        if missing:
            raise InsightADError(f"{origin}: weights lack {len(missing)} tensors of {self.arch} (e.g. {missing[0]})")
        for k, v in own.items():
            if full_sd[k].shape != v.shape:
                raise InsightADError(f"{origin}: tensor {k} has shape {tuple(full_sd[k].shape)}, "
                                     f"expected {tuple(v.shape)}")
        self.body.load_state_dict({k: full_sd[k] for k in own}, strict=True)


MAX_BACKBONE_PARAMS = 200_000_000  # wide_resnet50_2 has 69 M; a giant network would exhaust memory first


def check_backbone_size(arch: str, limit: int = MAX_BACKBONE_PARAMS) -> None:
    """Refuse an architecture with more than ``limit`` parameters before any memory is allocated for it
    (counted on PyTorch's meta device, which holds shapes only). Registered backbones are known to fit."""
    import timm

    if arch in {spec.arch for spec in BACKBONES.values()}:
        return
    if not timm.is_model(arch):
        raise InsightADError(f"backbone: unknown architecture {arch[:100]!r} (known: {', '.join(BACKBONES)}, "
                             "any timm model, or ssl:PATH)")
    with torch.device("meta"):
        n = sum(p.numel() for p in timm.create_model(arch, pretrained=False).parameters())
    if n > limit:
        raise InsightADError(f"backbone: {arch} has {n / 1e6:.0f} M parameters, more than the {limit / 1e6:.0f} M "
                             "this tool accepts (the memory it needs would exhaust a normal machine)")


def layer_indices(spec: BackboneSpec, layers: Sequence[int | str]) -> list[int]:
    """Levels given by index (0 = finest) or by module name (``layer2``, ``blocks.2``)."""
    import timm

    out = []
    names = None
    for layer in layers:
        if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
            out.append(int(layer))
            continue
        if names is None:
            probe = timm.create_model(spec.arch, pretrained=False, features_only=True)
            names = list(cast("FeatureInfo", probe.feature_info).module_name())
        if layer not in names:
            raise InsightADError(f"layers: {layer!r} is not a feature level of {spec.arch} (levels: {', '.join(names)})")
        out.append(names.index(layer))
    return out


def build_extractor(backbone: str, layers: Sequence[int | str], weights: str | None = None,
                    *, pretrained: bool = True, in_chans: int = 3) -> tuple[FeatureExtractor, BackboneSpec, str]:
    """(frozen extractor in eval mode, its spec, where its weights came from).

    ``pretrained=False`` builds the architecture only (used when a model file supplies the weights).
    """
    spec = get_spec(backbone)
    check_backbone_size(spec.arch)
    extractor = FeatureExtractor(spec.arch, layer_indices(spec, layers), in_chans)
    source = "model-file"
    if pretrained:
        sd, source = resolve_weights(spec, weights)
        if sd is not None:
            extractor.load_weights(sd, source)
    extractor.eval().requires_grad_(False)
    return extractor, spec, source
