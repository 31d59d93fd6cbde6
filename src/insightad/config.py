"""Every default in one place: typed dataclasses that the CLI, config files and detectors share.

A dataclass field becomes a CLI flag (``--name``, plus the aliases in its metadata) and a key of
the optional TOML ``--config`` file; flags override the file, the file overrides these defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from insightad.errors import InsightADError


def param(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
          maximum: float | None = None, aliases: tuple[str, ...] = (), exclusive_min: bool = False) -> Any:
    """A dataclass field carrying what the CLI and validation need to know about it."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
            "aliases": aliases, "exclusive_min": exclusive_min}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def validate(obj: Any) -> None:
    """Check every field against its metadata; raise one line naming the field and what was expected."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if value is None:
            continue
        kind = _base_type(hints.get(f.name))
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InsightADError(f"{f.name}: expected a number, got {value!r}")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise InsightADError(f"{f.name}: expected a whole number, got {value!r}")
            value = int(value)
            setattr(obj, f.name, value)
        if kind is float and isinstance(value, int):
            setattr(obj, f.name, float(value))
        if meta.get("choices") and value not in meta["choices"]:
            raise InsightADError(f"{f.name}: expected one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
            rel = ">" if meta.get("exclusive_min") else ">="
            raise InsightADError(f"{f.name}: expected a value {rel} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise InsightADError(f"{f.name}: expected a value <= {hi}, got {value!r}")


def _base_type(hint: Any) -> Any:
    """int for ``int``/``int | None``; the list origin for ``list[int]``; else the hint."""
    if hint is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _base_type(args[0])
    return origin or hint


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1 else hint


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> base type (int, float, str, bool, list, tuple)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def build(cls: type, values: dict[str, Any], *, where: str = "") -> Any:
    """Make ``cls`` from a dict, refusing unknown keys by name, then validate."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InsightADError(f"{where or cls.__name__}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
    obj = cls(**values)
    validate(obj)
    return obj


# --------------------------------------------------------------------------------------- data
LAYOUTS = ("auto", "mvtec", "folder", "crack", "images")


@dataclass
class DataParams:
    """Where images come from and how normal images are split for training and held out."""

    layout: str = param("auto", "dataset layout; auto detects MVTec AD, normal/abnormal folders, "
                        "crack (Negative/Positive) or a flat folder of normal images", choices=LAYOUTS)
    normal_dir: str = param("normal", "name of the normal-images folder (folder layout)")
    abnormal_dir: str = param("abnormal", "name of the anomalous-images folder (folder layout)")
    holdout: float = param(0.2, "fraction of normal images held out of training where the layout has "
                           "no test split", minimum=0.0, maximum=0.9)
    seed: int = param(0, "random seed (hold-out split, sampling, initialisation)")


# ---------------------------------------------------------------------------------- detectors
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass
class DetectorParams:
    """Hyper-parameters every detector shares: backbone, input size, batching, device."""

    backbone: str = param(DEFAULT_BACKBONE, "backbone name (tf_efficientnet_lite0, tf_efficientnet_lite2, "
                          "resnet18, wide_resnet50_2, any timm name) or ssl:PATH")
    weights: str | None = param(None, "backbone weights: a .safetensors/.pth file, 'random', or unset to "
                                "use the installed weight package / hub cache")
    image_size: int = param(256, "side of the square image the model works at", minimum=16)
    batch_size: int = param(16, "images per batch", minimum=1, aliases=("--batch_size",))
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    device: str = param("auto", "auto, cpu or cuda")
    seed: int = param(0, "random seed")


@dataclass
class BaselineParams(DetectorParams):
    """Frozen ImageNet features pooled per image, distance to the normal training set."""

    layers: list[int] = param([2, 3, 4], "backbone feature levels to pool (0 = finest)")
    scorer: str = param("knn", "knn: mean distance to the k nearest normal images; gaussian: "
                        "Mahalanobis distance with a shrunk covariance", choices=("knn", "gaussian"))
    k: int = param(3, "neighbours for the knn scorer", minimum=1)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of leave-one-out "
                                        "training scores", minimum=0.0, maximum=100.0)


@dataclass
class PadimParams(DetectorParams):
    """PaDiM: one Gaussian per patch position on multi-layer features; Mahalanobis distance maps."""

    layers: list[int] = param([1, 2, 3], "backbone feature levels (0 = finest), upsampled to the finest "
                              "and concatenated")
    n_features: int = param(120, "feature channels kept after reduction (ignored by reduction=none)", minimum=1)
    reduction: str = param("random", "channel reduction: random selection (as in the paper), pca, or none",
                           choices=("random", "pca", "none"))
    pca_images: int = param(32, "training images whose patches fit the PCA (reduction=pca)", minimum=1)
    epsilon: float = param(0.01, "diagonal regulariser added to every patch covariance", minimum=0.0,
                           exclusive_min=True)
    sigma: float = param(4.0, "Gaussian smoothing of the map, in input pixels (0: none)", minimum=0.0)
    threshold_holdout: float = param(0.1, "fraction of training images (at most 64) scored before they join the "
                                     "statistics, for the default threshold", minimum=0.0, maximum=0.5)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of the held-out "
                                        "training scores", minimum=0.0, maximum=100.0)


@dataclass
class PatchCoreParams(DetectorParams):
    """PatchCore: a coreset memory bank of locally aware patch features; nearest-neighbour distance maps."""

    layers: list[int] = param([2, 3], "backbone feature levels (0 = finest), upsampled to the finer "
                              "and concatenated")
    coreset_ratio: float = param(0.1, "fraction of training patches kept in the memory bank",
                                 minimum=0.0, maximum=1.0, exclusive_min=True, aliases=("--coreset",))
    projection_dim: int = param(32, "dimension of the random projection used for coreset selection "
                                "(0: the full features)", minimum=0)
    neighbourhood: int = param(3, "side of the neighbourhood averaged into each patch feature (odd)", minimum=1)
    num_neighbors: int = param(9, "bank neighbours used by the image-score re-weighting", minimum=1)
    sigma: float = param(4.0, "Gaussian smoothing of the map, in input pixels (0: none)", minimum=0.0)
    feature_cache_mb: int = param(256, "full-size training features kept in memory up to this size; "
                                  "past it a second pass recomputes only the memory bank's", minimum=0)
    threshold_images: int = param(16, "training images scored leave-one-image-out for the default "
                                  "threshold", minimum=1)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of the leave-one-"
                                        "image-out training scores", minimum=0.0, maximum=100.0)


# ------------------------------------------------------------------------------------- output
@dataclass
class RunParams:
    """Settings of a command run rather than of a model."""

    out: str | None = param(None, "output path (printed at the end)")
    progress: bool = param(True, "show progress bars")
