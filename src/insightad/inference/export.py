"""A fitted detector -> one self-contained ONNX graph: the decoded uint8 image at its own size in, the
resize and normalisation inside, scores (and maps at model size) out; everything a decision needs rides
along as metadata (docs/onnx.md). The graph is verified against PyTorch (``engines.export``) before
anything is written.

Where a graph comes from at inference (``cached_engine``): the file beside the model
(``model.safetensors`` -> ``model.onnx``, written by ``train``) when it is stamped with this model file's
sha256, else the hash-keyed cache, else a fresh export into the cache.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insightad.decide.normalize import default_scale
from insightad.engines.cache import cache_dir, model_digest, prune_cache
from insightad.engines.onnx_runtime import (
    CACHE_KEY,
    GRAPH_LAYOUT,
    GRAPH_REVISION,
    LAYOUT_KEY,
    ONNX_FORMAT,
    REVISION_KEY,
    OnnxEngine,
    read_stamp,
    verified_entry,
)
from insightad.errors import InsightADError
from insightad.runtime import torch_available
from insightad.version import __version__

if TYPE_CHECKING:
    from insightad.methods.base import Detector

FLAT_KEYS = ("threshold", "score_scale", "input_height", "input_width", "channels", "resize", "method",
             LAYOUT_KEY, REVISION_KEY)

# How InsightAD turns a file into the graph's input (data.images.load_image, data.preprocess): what
# another language must do to score the same pixels.
DECODE_CONTRACT = {
    "formats": "PNG, JPEG (first frame of a multi-picture JPEG), BMP, TIFF; others are refused, and so are a "
               "TIFF of several pages and an animated PNG of several frames",
    "exif_orientation": "not applied: pixels in the order the file stores them",
    "icc_profile": "ignored: no colour management",
    "gray_16bit": "I;16 images (16-bit PNG/TIFF gray): level = floor(v * 255 / 65535 + 0.5)",
    "int32_float": "32-bit integer or float gray images: stretched over the image's own range, "
                   "level = floor((v - min) / (max - min) * 255 + 0.5) (all 0 for a constant image); "
                   "NaN or infinity is refused",
    "color_16bit": "16-bit colour PNG: Pillow keeps the high byte of each sample",
    "alpha": "dropped, never composited (RGBA -> RGB, LA -> L, palette transparency ignored)",
    "palette_cmyk_other": "converted to RGB by Pillow (palette expanded; CMYK without a profile)",
    "to_3_channels": "gray (1-bit, L) replicated into R = G = B",
    "to_1_channel": "RGB to gray with L = (R*19595 + G*38470 + B*7471 + 32768) >> 16 (ITU-R 601-2 luma)",
    "layout": "uint8 N x C x H x W, channels R, G, B (or L), each image at its own size; images of one "
              "call share one size",
    "resize": "inside the graph: float antialiased bilinear (ONNX Resize linear, antialias=1, half_pixel, "
              "exclude_outside=1) to input_height x input_width; callers do not resize",
}


def onnx_metadata(det: Detector) -> dict[str, Any]:
    """Everything a user of the graph in another language needs to decide like the model does."""
    p = det.preprocessing_
    info = dict(getattr(det, "threshold_info_", {}) or {})
    scale = info.get("scale")
    scale = float(scale) if scale and float(scale) > 0 else default_scale(det.threshold_)
    return {"format": ONNX_FORMAT, "package_version": __version__, "method": det.method,
            "has_maps": bool(det.has_maps), "threshold": det.threshold_,
            "threshold_strategy": det.threshold_strategy_, "threshold_details": info,
            "score_scale": scale,
            "score_normalized": "1 / (1 + exp(-(score - threshold) / score_scale)); anomalous when score > "
                                "threshold (score_normalized > 0.5)",
            "pixel_threshold": info.get("pixel_threshold"),
            "input_height": p.size[0], "input_width": p.size[1],
            "channels": p.channels, "resize": p.resize, "mean": list(p.mean), "std": list(p.std),
            "input": "images: uint8 N x C x H x W at the image's own size (H, W any); resize and "
                     "normalisation are inside the graph",
            "outputs": ["scores"] + (["maps"] if det.has_maps else []),
            "maps": "N x input_height x input_width anomaly maps at model size; upsample them (bilinear) to "
                    "the image's size" if det.has_maps else None,
            "tiles": int(getattr(det, "tile", 1) or 1),  # per side: scored as config.images_per_run says
            "decode": DECODE_CONTRACT, "backbone": getattr(det, "backbone", None),
            # which files trained it: evaluate on the export scores the held-out split, never a training image
            "split": getattr(det, "split_", None),
            LAYOUT_KEY: GRAPH_LAYOUT, REVISION_KEY: GRAPH_REVISION}


def export_onnx(det: Detector, out: str | Path, model_sha256: str | None = None, verify: bool = True,
                release: bool = False) -> Path:
    """Write ``det``'s verified graph to ``out`` atomically, stamped with ``model_sha256`` (the model file it
    was made from) when given; raises if it cannot be exported faithfully. ``release``: ``det`` is not used
    afterwards (its large tensors are let go before ONNX Runtime loads the graph to check it)."""
    from insightad.engines.export import export_verified, image_examples  # PyTorch: exporting needs it

    det._check_fitted()
    if det.onnx_unsupported:
        raise InsightADError(f"{det.method}: cannot export to ONNX: {det.onnx_unsupported}")
    model = getattr(det, "model_", None)
    if model is None:
        raise InsightADError(f"{det.method}: this detector runs from an ONNX graph already; nothing to export")
    p = det.preprocessing_
    outputs = ["scores"] + (["maps"] if det.has_maps else [])
    meta = onnx_metadata(det)
    keys: tuple[str, ...] = FLAT_KEYS
    if model_sha256:
        meta[CACHE_KEY] = model_sha256
        keys = (*keys, CACHE_KEY)
    # A model whose PyTorch path approximates (PatchCore's HNSW search) exports its exact twin.
    exported = getattr(model, "exported", None)
    module = exported() if callable(exported) else model
    return export_verified(module, image_examples(p.channels, p.size), outputs, det.method, out,
                           metadata=meta, flat_keys=keys, check=verify, resize_to=p.size, release=release)


def beside(model_path: str | Path) -> Path:
    """The graph written next to a model file: ``model.safetensors`` -> ``model.onnx``."""
    return Path(model_path).with_suffix(".onnx")


def check_graph_output(out: Path, model: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, a graph name (``export --out``, the graph ``train`` writes beside its model) whose
    file a graph would destroy: another model's graph (:func:`model_beside`), or a file that is not an ONNX graph
    at all (or a link to one: an image, notes)."""
    from insightad.io import is_regular_file, looks_like_onnx

    other = model_beside(out, model)
    if other is not None:
        raise InsightADError(f"{flag} {out}: the ONNX graph beside another model file ({other}), which scores "
                             "that model; writing this model's graph there would replace it: choose another name")
    if is_regular_file(out) and out.stat().st_size > 0 and not looks_like_onnx(out):
        target = out.resolve()
        what = f"links to {target}, which" if target != out.absolute() else "exists and"
        raise InsightADError(f"{flag} {out}: {what} is not an ONNX graph; writing one there would destroy it: "
                             "choose another name")


def model_beside(graph: str | Path, model: str | Path) -> Path | None:
    """Another model file (not ``model``, nor a copy of it) whose own graph ``graph`` is: beside it by name
    (``other.safetensors`` for ``other.onnx``) and stamped with its sha256. Predict, serve and the runtime
    install score that model with it, so writing ``model``'s graph there would take it away. None otherwise."""
    import glob

    graph = Path(graph)
    stamp = read_stamp(graph)
    if stamp is None or stamp == model_digest(model):
        return None
    siblings = graph.parent.glob(f"{glob.escape(graph.stem)}.*")
    for candidate in sorted(siblings, key=lambda c: (c.suffix != ".safetensors", c.name)):
        if candidate.is_file() and candidate.resolve() != graph.resolve() and beside(candidate) == graph \
                and model_digest(candidate) == stamp:
            return candidate
    return None


def stored_engine(model_path: str | Path, threads: int | None = None, digest: str | None = None, arena: bool = True
                  ) -> OnnxEngine | None:
    """The graph of the model file at ``model_path`` already on disk (no PyTorch needed): the one beside it
    when stamped with the file's sha256, else the cache entry so stamped; None when there is none."""
    digest = digest or model_digest(model_path)
    side = beside(model_path)
    if side.exists() and side != Path(model_path):
        # Where nothing can rebuild it (no PyTorch), this model's graph of an older revision serves: reading it
        # (check_metadata) says so in one warning line.
        engine = verified_entry(side, digest, threads, delete=False, arena=arena, older=not torch_available())
        if engine is not None:
            return engine
        warnings.warn(f"{side}: not the graph of {model_path} (stale, damaged or of an older layout); not used. "
                      f"Refresh it with 'insightad export --model {model_path}'", stacklevel=2)
    return verified_entry(cache_dir() / f"{digest}.onnx", digest, threads, arena=arena)


def cached_engine(det: Detector, model_path: str | Path, threads: int | None = None, arena: bool = True
                  ) -> OnnxEngine:
    """An ONNX Runtime engine for the model file at ``model_path``: the graph beside it when stamped with the
    sha256 of the model file's content, else the cache entry so stamped, else a fresh export into the cache.
    A graph whose stamp does not match (stale, truncated, swapped, damaged) is never used: a cache entry is
    rebuilt from the PyTorch model, or refused where there is none."""
    digest = model_digest(model_path)
    engine = stored_engine(model_path, threads, digest, arena)
    if engine is not None:
        return engine
    target = cache_dir() / f"{digest}.onnx"
    if getattr(det, "model_", None) is None:
        raise InsightADError(f"{target}: cached ONNX graph for {model_path} is missing, damaged or made from "
                             "another model, and PyTorch is not available to rebuild it; install insightad[train] "
                             "or export the model with 'insightad export' where PyTorch is installed")
    try:
        export_onnx(det, target, digest)
        prune_cache(keep=target)
    except OSError:  # a read-only home is no reason to fail a prediction: export beside nothing, in a temp folder
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return OnnxEngine(str(export_onnx(det, Path(tmp) / "model.onnx", digest)), threads, arena, ready=False)
    return OnnxEngine(str(target), threads, arena)
