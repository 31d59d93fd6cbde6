"""Every default in one place: typed dataclasses that the CLI, config files and detectors share.

A dataclass field becomes a CLI flag (``--name``, plus the aliases in its metadata) and a key of
the optional TOML ``--config`` file; flags override the file, the file overrides these defaults.
"""

from __future__ import annotations

import dataclasses
import math
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
        if kind in (int, float) and not math.isfinite(value):
            raise InsightADError(f"{f.name}: expected a finite number, got {value!r}")
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


MAX_IMAGE_SIDE = 4096  # the largest image side a model works at: bigger would exhaust memory before it helps

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


# ----------------------------------------------------------------------------------- training
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
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
                                       "unset: beside --out, named <out>.training")
    augment: str = param("none", "augmentation applied to training images: none, affine (the rotation/shift/"
                         "shear/zoom/flip of 'insightad augment'; without rotation for ssl) or affine-norotate")
    device: str = param("auto", "auto (a CUDA GPU when present, else the CPU), cpu or cuda")
    seed: int = param(0, "random seed (initialisation, shuffling, validation split)")


# ---------------------------------------------------------------------------------- detectors
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass
class DetectorParams:
    """Hyper-parameters every detector shares: backbone, input size, batching, device."""

    backbone: str = param(DEFAULT_BACKBONE, "backbone name (tf_efficientnet_lite0, tf_efficientnet_lite2, "
                          "resnet18, wide_resnet50_2, any timm name) or ssl:PATH")
    weights: str | None = param(None, "backbone weights: a .safetensors/.pth file, 'random', or unset to "
                                "use the installed weight package / hub cache")
    image_size: int = param(256, "side of the square image the model works at", minimum=16,
                            maximum=MAX_IMAGE_SIDE)
    batch_size: int = param(16, "images per batch", minimum=1, aliases=("--batch_size",))
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    device: str = param("auto", "auto, cpu or cuda")
    fit_engine: str = param("auto", "engine for the frozen backbone during fit (auto: ONNX Runtime on CPU "
                            "when installed)", choices=("auto", "torch", "onnx"))
    seed: int = param(0, "random seed")


# ---------------------------------------------------------------------------- trained methods
SSL_INITS = ("imagenet", "random")


@dataclass
class SSLParams(TrainLoopParams):
    """Rotation-prediction pretraining of a backbone on unlabelled images (writes a backbone file)."""

    backbone: str = param(DEFAULT_BACKBONE, "architecture to train (a timm name, or ssl:PATH to continue "
                          "from an earlier backbone file)")
    init: str = param("imagenet", "start from the backbone's ImageNet weights or from random weights",
                      choices=SSL_INITS)
    weights: str | None = param(None, "with --init imagenet: a .safetensors/.pth file to start from "
                                "instead of the installed ImageNet weights")
    image_size: int = param(128, "side of the square image the backbone trains at", minimum=16,
                            maximum=MAX_IMAGE_SIDE)
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    epochs: int = param(10, "training epochs (each image is seen at 4 rotations per epoch)", minimum=1,
                        aliases=("--epoch",))
    min_accuracy: float = param(0.4, "warn when the best rotation accuracy stays below this (chance is 0.25)",
                                minimum=0.0, maximum=1.0)


SVDD_OBJECTIVES = ("one-class", "soft-boundary")


@dataclass
class SVDDParams(TrainLoopParams, DetectorParams):
    """Deep SVDD: a bias-free projection head on frozen pooled backbone features, pulled towards a centre c."""

    layers: list[int] = param([1, 2, 3], "backbone feature levels to pool (0 = finest)")
    pooling: str = param("mean_std", "per-channel statistics of each level: mean, or mean and spatial "
                         "standard deviation (sees thin local defects such as cracks better)",
                         choices=("mean", "mean_std"))
    objective: str = param("one-class", "one-class: mean squared distance to c; soft-boundary: radius R "
                           "plus the distances beyond it, weighted by 1/nu", choices=SVDD_OBJECTIVES)
    nu: float = param(0.1, "soft-boundary: the fraction of training images allowed outside the sphere",
                      minimum=0.0, maximum=1.0, exclusive_min=True)
    rep_dim: int = param(128, "dimension of the embedding space", minimum=1)
    hidden: list[int] = param([512], "hidden layer widths of the projection head (empty: one linear map)")
    eps: float = param(0.1, "centre coordinates closer to zero than this are pushed out to +-eps "
                       "(a centre at 0 is trivially reached by zero weights)", minimum=0.0)
    warmup_epochs: int = param(2, "soft-boundary: epochs before the radius R is first updated", minimum=0)
    epochs: int = param(200, "training epochs (the head trains on cached features: seconds, not minutes)",
                        minimum=1, aliases=("--epoch",))
    patience: int = param(10, "early stopping: stop after this many epochs without improvement of the "
                          "validation loss (0: never stop early)", minimum=0)
    threshold_percentile: float = param(99.0, "default threshold (one-class): this percentile of the "
                                        "validation (else training) distances", minimum=0.0, maximum=100.0)


@dataclass
class BaselineParams(DetectorParams):
    """Frozen ImageNet features pooled per image, distance to the normal training set."""

    layers: list[int] = param([2, 3, 4], "backbone feature levels to pool (0 = finest)")
    scorer: str = param("knn", "knn: mean distance to the k nearest normal images; gaussian: "
                        "Mahalanobis distance with a shrunk covariance", choices=("knn", "gaussian"))
    k: int = param(3, "neighbours for the knn scorer", minimum=1)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of leave-one-out "
                                        "training scores", minimum=0.0, maximum=100.0)


AE_ARCHS = ("bottleneck", "seed")


@dataclass
class AutoencoderParams(TrainLoopParams):
    """Convolutional autoencoder: (1 - alpha) * MSE + alpha * (1 - SSIM); reconstruction error is the map."""

    arch: str = param("bottleneck", "network: bottleneck (a narrow latent that cannot copy defects) or seed "
                      "(the second seed's 4-conv encoder, grayscale by default)", choices=AE_ARCHS)
    channels: int = param(0, "1 (grayscale) or 3 (colour); 0: colour when the images are, grayscale for "
                          "--arch seed", minimum=0, maximum=3)
    latent: int = param(32, "bottleneck: channels of the latent at 1/16 of the image side", minimum=1)
    image_size: int = param(256, "side of the square image the model works at (a multiple of 16)", minimum=32,
                            maximum=MAX_IMAGE_SIDE)
    workers: int = param(-1, "image-decoding worker processes (-1: automatic)", minimum=-1)
    alpha: float = param(0.84, "weight of (1 - SSIM) in the loss", minimum=0.0, maximum=1.0)
    ssim_window: int = param(11, "SSIM window size (odd)", minimum=3)
    map: str = param("mse", "anomaly map: per-pixel squared error (mse) or 1 - local SSIM (ssim)",
                     choices=("mse", "ssim"))
    score: str = param("max", "image score: the maximum or the mean of the smoothed map", choices=("max", "mean"))
    smooth_sigma: float = param(4.0, "Gaussian smoothing of the map, in pixels at the model's size (0: none)",
                                minimum=0.0)
    epochs: int = param(100, "training epochs", minimum=1, aliases=("--epoch",))
    lr: float = param(1e-3, "learning rate", minimum=0.0, maximum=10.0, exclusive_min=True,
                      aliases=("--learning-rate", "--learning_rate"))
    batch_size: int = param(16, "images per batch", minimum=1, aliases=("--batch_size",))
    patience: int = param(10, "early stopping: stop after this many epochs without improvement of the "
                          "validation loss (0: never stop early)", minimum=0)
    threshold_percentile: float = param(99.0, "default threshold: this percentile of the validation (else "
                                        "training) scores", minimum=0.0, maximum=100.0)


# ------------------------------------------------------------------------------- augmentation
@dataclass
class AugmentParams:
    """The second seed's augmentation of normal images; each part switchable, ranges settable."""

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


# -------------------------------------------------------------------------------------- serve
@dataclass
class ServeParams:
    """HTTP inference server: where it listens, what it accepts, how it batches and sheds load."""

    host: str = param("127.0.0.1", "address to listen on (0.0.0.0 opens the server to the network)")
    port: int = param(8080, "TCP port", minimum=0, maximum=65535)
    max_body_mb: float = param(20.0, "largest request body in MB; bigger requests get 413 before "
                               "they are read whole", minimum=0.0, exclusive_min=True)
    max_pixels: int = param(40_000_000, "largest decoded image in pixels (width x height); bigger "
                            "images (decompression bombs) get 400", minimum=1)
    max_batch: int = param(8, "most images in one forward pass (micro-batch of concurrent requests)",
                           minimum=1)
    batch_wait_ms: float = param(2.0, "how long the inference worker waits for more requests to join "
                                 "a micro-batch", minimum=0.0, maximum=1000.0)
    queue_size: int = param(64, "requests admitted and waiting for inference; when full, new requests "
                            "get 503", minimum=1)
    max_images: int = param(32, "most images in one POST /infer/batch request", minimum=1)
    timeout_s: float = param(60.0, "a request waiting longer than this for inference gets 503",
                             minimum=0.0, exclusive_min=True)
    api_key: str | None = param(None, "require this key in X-API-Key or 'Authorization: Bearer'; unset: "
                                "the INSIGHTAD_API_KEY environment variable if set, else no key")
    engine: str = param("auto", "inference engine (auto: PyTorch on a CUDA GPU when --device gives one, else "
                        "ONNX Runtime on the CPU when installed, else PyTorch)", choices=("auto", "torch", "onnx"))
    device: str = param("auto", "auto (a CUDA GPU when present, else the CPU), cpu or cuda; the same default as "
                        "train and predict")
    threads: int = param(0, "PyTorch CPU threads for inference (0: PyTorch's default)", minimum=0)
    decode_threads: int = param(0, "threads that parse and decode request images (0: one per CPU core, "
                                "at most 4)", minimum=0)
    access_log: bool = param(True, "log one line per request")
