"""Typed defaults: the machinery every Params class uses, and the settings several layers share.

Each method's hyper-parameters live beside it (``methods/<name>.py``); a server's in
``apps/serve/settings.py``. A dataclass field becomes a CLI flag (``--name``, plus the aliases in its metadata) and a key of
the optional TOML ``--config`` file; flags override the file, the file overrides these defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, dataclass_transform

from insightad.errors import InsightADError

T = TypeVar("T")


@dataclass_transform(field_specifiers=(field,))
def params(cls: type[T]) -> type[T]:
    """Make ``cls`` a hyper-parameter dataclass: a real ``__init__`` signature (what scikit-learn's
    ``clone`` and a reader's IDE see), no generated ``__eq__``/``__repr__`` (a Detector inherits it),
    and every value checked against its field's metadata when the object is made."""
    if not hasattr(cls, "__post_init__"):
        cls.__post_init__ = validate  # type: ignore[attr-defined]
    return dataclass(eq=False, repr=False)(cls)


def param(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
          maximum: float | None = None, aliases: tuple[str, ...] = (), exclusive_min: bool = False,
          value_aliases: dict[str, str] | None = None, min_items: int = 1, path: bool = False) -> Any:
    """A dataclass field carrying what the CLI and validation need to know about it.

    ``aliases``: other flag spellings; ``value_aliases``: old spellings of a choice, accepted and
    replaced by the current one (hidden from help); ``min_items``: the fewest items a list takes (an
    empty ``--layers ''`` would fail deep inside a fit; 0 where empty means something); ``path``: a file or
    folder, whose ``~`` the CLI expands."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
            "aliases": aliases, "exclusive_min": exclusive_min, "value_aliases": value_aliases or {},
            "min_items": min_items, "path": path}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


LEVEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")  # a backbone module: blocks.2, layer3
LEVEL_FIELDS = frozenset({"layers"})  # list settings of backbone levels: numbers or module names


def parse_list(text: str, elem: type, names: bool = False) -> list:
    """``"1,2,3"`` or ``"1 2 3"`` -> ``[1, 2, 3]``: a list setting as the command line takes it (and a config
    file or a constructor may give it). ``names``: an item that is a module name (``blocks.2``) stays a
    string (backbone levels). ValueError for an element that is not an ``elem``."""
    tokens = re.split(r"\s*,\s*|\s+", text.strip()) if text.strip() else []
    if "" in tokens:  # "1,,2" or "1,2,": a missing item is a typo, not a shorter list
        raise ValueError(f"an empty item in {text!r}")
    return [t if names and LEVEL_NAME.fullmatch(t) else elem(t) for t in tokens]


def _checked_list(name: str, value: Any, hint: Any, default: Any) -> list:
    """A list field's value as a list: a string is parsed as the command line parses it, a tuple becomes a
    list; anything else, or an element of the wrong type, is refused in one line."""
    args = typing.get_args(_strip_optional(hint))
    elem = args[0] if args and isinstance(args[0], type) else str
    example = ",".join(map(str, default)) if isinstance(default, (list, tuple)) and default else "a,b"
    expected = f"{name}: expected a list of {elem.__name__} (e.g. {example})"
    try:
        items = (parse_list(value, elem, names=name in LEVEL_FIELDS) if isinstance(value, str)
                 else list(value) if isinstance(value, tuple) else value)
    except ValueError:
        raise InsightADError(f"{expected}, got {value!r}") from None
    # int lists also take level names (layers: "blocks.2"); a bool or a float is never a list element here
    ok = isinstance(items, list) and all(
        isinstance(v, str) or (elem is not str and isinstance(v, elem) and not isinstance(v, bool)) for v in items)
    if not ok:
        raise InsightADError(f"{expected}, got {value!r}")
    return items


def validate(obj: Any) -> None:
    """Check every field against its metadata; raise one line naming the field and what was expected."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if value is None:
            continue
        kind = _base_type(hints.get(f.name))
        if kind in (list, tuple):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            items = _checked_list(f.name, value, hints.get(f.name), default)
            if len(items) < meta.get("min_items", 0):
                raise InsightADError(f"{f.name}: expected at least {meta['min_items']} item"
                                     f"{'s' if meta['min_items'] > 1 else ''}, got an empty list")
            if items is not value:
                setattr(obj, f.name, items)
            continue
        if kind is bool:
            if not isinstance(value, bool):  # a config file's "no" would otherwise count as true
                raise InsightADError(f"{f.name}: expected true or false, got {value!r}")
            continue
        if kind is str and not isinstance(value, str):
            if not isinstance(value, os.PathLike):
                raise InsightADError(f"{f.name}: expected text, got {value!r}")
            value = os.fspath(value)
            setattr(obj, f.name, value)
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InsightADError(f"{f.name}: expected a number, got {value!r}")
        if kind in (int, float) and not math.isfinite(value):
            raise InsightADError(f"{f.name}: expected a finite number, got {value!r}")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise InsightADError(f"{f.name}: expected a whole number, got {value!r}")
            value = int(value)
            setattr(obj, f.name, value)
        if kind is float and isinstance(value, int):
            setattr(obj, f.name, float(value))
        if isinstance(value, str) and value in meta.get("value_aliases", {}):
            value = meta["value_aliases"][value]
            setattr(obj, f.name, value)
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
    unions = (typing.Union, getattr(__import__("types"), "UnionType", None))
    return args[0] if typing.get_origin(hint) in unions and len(args) == 1 else hint


def build(cls: type, values: dict[str, Any], *, where: str = "") -> Any:
    """Make ``cls`` from a dict, refusing unknown keys by name, then validate."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InsightADError(f"{where or cls.__name__}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
    obj = cls(**values)
    validate(obj)
    return obj


TILE_BATCH = 16  # tiles of a tiled model through the method's model at once (methods.tiling)


def images_per_run(tiles: int) -> int | None:
    """Images of a tiled model (``tiles`` per side) an exported graph is given at once: about ``TILE_BATCH``
    tiles, at least one image (memory bounded as on PyTorch; graphs exported before the graph took every tile
    at once scored only the tiles their traced slices covered, at least ``TILE_BATCH``). None when untiled."""
    tiles = int(tiles or 1)
    return None if tiles <= 1 else max(1, TILE_BATCH // (tiles * tiles))


MAX_IMAGE_SIDE = 4096  # the largest image side a model works at: bigger would exhaust memory before it helps
MAX_DRAWS = 10_000  # evaluate --draws: seeded test subsets; more change no figure shown, and a typo's extra zeros ran for days


def check_resampling(prevalence: float, draws: int) -> None:
    """evaluate's --prevalence and --draws (the report's balanced/unbalanced draws), each refused in one line."""
    if not 0 < prevalence < 1:
        raise InsightADError(f"--prevalence: expected a value between 0 and 1 (exclusive), got {prevalence:g}")
    if not 1 <= draws <= MAX_DRAWS:
        raise InsightADError(f"--draws: expected 1 to {MAX_DRAWS}, got {draws}")

SEED_MAX = 2**63 - 1  # --seed (the split, the validation folds, the report draws): NumPy refuses negative seeds
# (a model file's own stored seed is not checked: files written with any seed keep loading)

# --------------------------------------------------------------------------------------- data
LAYOUTS = ("mvtec", "folder", "crack", "images")  # every dataset layout InsightAD reads (data.layouts)


@params
class DataParams:
    """Where images come from and how normal images are split for training and held out."""

    layout: str = param("auto", "dataset layout; auto detects MVTec AD, normal/abnormal folders, "
                        "crack (Negative/Positive) or a flat folder of normal images", choices=("auto", *LAYOUTS))
    normal_dir: str = param("normal", "name of the normal-images folder (folder layout)")
    abnormal_dir: str = param("abnormal", "name of the anomalous-images folder (folder layout)")
    holdout: float = param(0.2, "fraction of normal images held out of training where the layout has "
                           "no test split", minimum=0.0, maximum=0.9)
    seed: int = param(0, "random seed (hold-out split, sampling, initialisation)", minimum=0, maximum=SEED_MAX)


REFIT_FOLDS = ("one", "all")
REFIT_FOLDS_HELP = ("the trained methods (svdd, autoencoder, an ensemble's members) and tiled models are validated by "
                    "refitting without the normals scored: one: on one held-out fold (one refit, 1/k of the normals "
                    "scored); all: on every fold (k refits, k times the validation's time, every training normal "
                    "scored: a steadier threshold; docs/decisions.md). Other methods are validated exactly on "
                    "every fold either way")


@dataclass
class DecisionParams:
    """How the default threshold is chosen right after training (out-of-fold normals, synthetic defects)."""

    threshold_strategy: str = param("fpr", "fpr: lowest threshold with estimated false-alarm rate <= "
                                    "--max-false-alarms; f1-synthetic: best F1 vs synthetic defects; "
                                    "percentile: the method's --threshold-percentile of out-of-fold normal scores",
                                    choices=("fpr", "f1-synthetic", "percentile"))
    max_false_alarms: float = param(0.02, "false-alarm rate the default threshold allows (strategy fpr)",
                                    minimum=0.0, maximum=0.5, exclusive_min=True)
    folds: int = param(5, "folds of the out-of-fold validation over the training normals", minimum=2)
    refit_folds: str = param("one", REFIT_FOLDS_HELP, choices=REFIT_FOLDS)
    candidates: list[str] = param(["baseline", "padim", "patchcore"], "methods --method auto compares")
    time_budget: float = param(300.0, "seconds --method auto may spend fitting candidates (the one running "
                               "when it runs out finishes)", minimum=0.0, exclusive_min=True)


# ----------------------------------------------------------------------------------- training
OPTIMIZERS = ("adam", "adamw", "sgd")


@params
class TrainLoopParams:
    """The shared training loop: epochs, batches, optimiser, early stopping, checkpoints, augmentation."""

    epochs: int = param(20, "training epochs (passes over the training images)", minimum=1, aliases=("--epoch",))
    batch_size: int = param(32, "images per batch", minimum=1, aliases=("--batch_size",))
    lr: float = param(1e-4, "learning rate", minimum=0.0, maximum=10.0, exclusive_min=True,
                      aliases=("--learning-rate", "--learning_rate"))
    optimizer: str = param("adam", "optimiser (sgd uses momentum 0.9)", choices=OPTIMIZERS)
    weight_decay: float = param(1e-6, "L2 weight decay (decoupled for adamw)", minimum=0.0, maximum=1.0)
    patience: int = param(5, "early stopping: stop after this many epochs without improvement of the "
                          "validation loss (0: never stop early)", minimum=0)
    val_fraction: float = param(0.1, "fraction of the training images held out to validate each epoch "
                                "(early stopping; 0: none)", minimum=0.0, maximum=0.5)
    resume: bool = param(False, "continue from the last complete checkpoint in --checkpoint-dir")
    checkpoint_dir: str | None = param(None, "folder for the per-epoch checkpoint, history and curves; "
                                       "unset: beside --out, named <out>.training", path=True)
    time_budget: float = param(0.0, "seconds of training after which the loop stops (after the current step; "
                               "the best weights so far are kept, early stopping still applies; 0: no budget)",
                               minimum=0.0)
    augment: str = param("none", "augmentation applied to training images: none, affine (the rotation/shift/"
                         "shear/zoom/flip of 'insightad augment'; without rotation for ssl) or affine-norotate")
    device: str = param("auto", "auto (a CUDA GPU when present, else the CPU), cpu or cuda")
    seed: int = param(0, "random seed (initialisation, shuffling, validation split)")


# ---------------------------------------------------------------------------------- detectors
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@params
class DetectorParams:
    """Hyper-parameters every detector shares: backbone, input size, batching, device."""

    backbone: str = param(DEFAULT_BACKBONE, "backbone name (tf_efficientnet_lite0, tf_efficientnet_lite2, "
                          "resnet18, wide_resnet50_2, any timm name), ssl:PATH (a backbone file of 'train --method "
                          "ssl'), or ssl: fine-tune one on the training images first (CutPaste, about 8 minutes "
                          "and 5 GB on a 2-core CPU; written beside the model as <model>.backbone.safetensors)")
    weights: str | None = param(None, "backbone weights: a .safetensors/.pth file, 'random', or unset to "
                                "use the installed weight package / hub cache", path=True)
    image_size: int = param(256, "side of the square image the model works at", minimum=16,
                            maximum=MAX_IMAGE_SIDE)
    batch_size: int = param(16, "images per batch", minimum=1, aliases=("--batch_size",))
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    device: str = param("auto", "auto, cpu or cuda")
    fit_engine: str = param("auto", "engine for the frozen backbone during fit (auto: ONNX Runtime on CPU "
                            "when installed)", choices=("auto", "torch", "onnx"))
    seed: int = param(0, "random seed")


@params
class TileParams:
    """Tiled work for small defects in large images (methods that can: baseline, padim, patchcore)."""

    tile: int = param(1, "tiles per side: the image is worked at the size that N x N tiles of --image-size px "
                      "overlapping by --overlap cover, each tile scored by the model, the maps stitched "
                      "(1: the whole image at --image-size)", minimum=1, maximum=16)
    overlap: float = param(0.25, "fraction of a tile shared with its neighbour (tile > 1)", minimum=0.0,
                           maximum=0.75)


# ------------------------------------------------------------------------------- augmentation
@params
class AugmentParams:
    """Augmentation of normal images (rotation, shift, shear, zoom, flips); each part switchable, ranges settable."""

    rotation: float = param(40.0, "maximum rotation in degrees (0 switches it off)", minimum=0.0, maximum=180.0)
    shift: float = param(0.2, "maximum shift as a fraction of width/height (0: off)", minimum=0.0, maximum=0.5)
    shear: float = param(0.2, "maximum shear factor (0.2 is about 11.3 degrees; 0: off)", minimum=0.0, maximum=1.0)
    zoom: float = param(0.2, "maximum zoom in or out as a fraction (0: off)", minimum=0.0, maximum=0.9)
    hflip: bool = param(True, "random horizontal flip")
    vflip: bool = param(False, "random vertical flip")
    fill: str = param("auto", "how to fill pixels uncovered by the transform: reflect (mirror: textures), "
                      "edge (repeat the border: objects on a plain background), constant (black), or auto "
                      "(edge when the image border is plain, else reflect)",
                      choices=("auto", "reflect", "edge", "constant"))


