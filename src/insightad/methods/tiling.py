"""Tiled inference for small defects in large images: the image is worked at a larger size and cut into
overlapping tiles of the model's own size; each tile is scored by the method's model, the maps are
stitched back with a window that falls to ~0 at tile edges (no seams), the image score is the
largest tile score. Training cuts the normal images the same way, so the model fits on tiles.

The grid is fixed by the settings (``tile`` tiles per side of ``image_size`` px, overlapping by
``overlap``), so a tiled model is a plain ``nn.Module`` with a fixed input size: it exports to ONNX
like any other, the graph doing the cutting and the stitching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from insightad.config import TILE_BATCH  # tiles through the method's model at once: memory bounded by it
from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError


def tile_stride(tile_size: int, overlap: float) -> int:
    """Pixels between tile starts: ``tile_size`` less the overlap (at least 1)."""
    return max(1, tile_size - int(round(overlap * tile_size)))


def working_size(tile_size: int, tiles: int, overlap: float) -> int:
    """Side the whole image is resized to so ``tiles`` x ``tiles`` tiles of ``tile_size`` cover it exactly."""
    return tile_size + (max(1, tiles) - 1) * tile_stride(tile_size, overlap)


def tile_starts(size: int, tile_size: int, stride: int) -> list[int]:
    """Start offsets along one side; the last tile ends exactly at ``size``."""
    if size <= tile_size:
        return [0]
    starts = list(range(0, size - tile_size, stride)) + [size - tile_size]
    return sorted(set(starts))


def blend_window(tile_size: int, floor: float = 1e-3) -> torch.Tensor:
    """(t, t) weights: a separable Hann window (falls towards 0 at the tile's edges, so where two tiles
    disagree the stitched map moves smoothly from one to the other) lifted by ``floor`` so the image's
    own border, covered by one tile only, keeps a well-defined value."""
    n = torch.arange(tile_size, dtype=torch.float32)
    w = 0.5 - 0.5 * torch.cos(2 * math.pi * (n + 0.5) / tile_size)
    return torch.outer(w, w) + floor


def cut(x: torch.Tensor, tile_size: int, stride: int) -> torch.Tensor:
    """(B, C, S, S) -> (B * T, C, t, t), tiles of each image consecutive, rows before columns."""
    starts = tile_starts(x.shape[-1], tile_size, stride)
    tiles = [x[:, :, r:r + tile_size, c:c + tile_size] for r in starts for c in starts]
    return torch.stack(tiles, 1).flatten(0, 1)


def stitch(maps: torch.Tensor, size: int, stride: int, window: torch.Tensor) -> torch.Tensor:
    """(B * T, t, t) tile maps -> (B, S, S): the window-weighted mean of every tile covering a pixel."""
    t = maps.shape[-1]
    starts = tile_starts(size, t, stride)
    per = len(starts) ** 2
    maps = maps.reshape(-1, per, t, t)
    out = maps.new_zeros(maps.shape[0], size, size)
    weight = maps.new_zeros(size, size)
    k = 0
    for r in starts:
        for c in starts:
            out[:, r:r + t, c:c + t] += maps[:, k] * window
            weight[r:r + t, c:c + t] += window
            k += 1
    return out / weight


class TiledModel(nn.Module):
    """uint8 images at the working size -> (image scores, stitched maps at the working size): the
    method's model (``inner``) on tiles, ``TILE_BATCH`` at a time."""

    window: torch.Tensor

    def __init__(self, inner: nn.Module, tile_size: int, tiles: int, overlap: float) -> None:
        super().__init__()
        self.inner = inner
        self.tile_size, self.tiles = int(tile_size), int(tiles)
        self.stride = tile_stride(self.tile_size, overlap)
        self.size = working_size(self.tile_size, self.tiles, overlap)
        self.register_buffer("window", blend_window(self.tile_size), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        tiles = cut(x, self.tile_size, self.stride)
        if torch.onnx.is_in_onnx_export():  # every tile at once: a traced loop would keep the example batch's
            # slices (its tile count), and a larger batch would lose its last tiles (wrong scores) or fail
            outs = [self.inner(tiles)]
        else:
            outs = [self.inner(tiles[i:i + TILE_BATCH]) for i in range(0, tiles.shape[0], TILE_BATCH)]
        scores = torch.cat([o[0] for o in outs]).reshape(b, -1).amax(1)
        if len(outs[0]) < 2:
            return (scores,)
        maps = torch.cat([o[1] for o in outs])
        return scores, stitch(maps, self.size, self.stride, self.window)

    def exported(self) -> TiledModel:
        """The twin the ONNX graph is checked against (see PatchCoreModel.exported)."""
        exported = getattr(self.inner, "exported", None)
        if exported is None:
            return self
        twin = TiledModel(exported(), self.tile_size, self.tiles, 0.0)
        twin.stride, twin.size = self.stride, self.size
        return twin


# ------------------------------------------------------------------------------ detector side
def is_tiled(det: Any) -> bool:
    return int(getattr(det, "tile", 1) or 1) > 1


def check_tileable(det: Any) -> None:
    if is_tiled(det) and not getattr(det, "tileable", False):
        raise InsightADError(f"tile: {det.method} cannot work on tiles (baseline, padim and patchcore can); "
                             "train it with --tile 1")


def training_tiles(det: Any, images: Sequence) -> list[np.ndarray]:
    """Normal images -> their tiles (uint8 HWC arrays of the model's size), the method's training set."""
    from insightad.data.loader import iter_batches

    size = working_size(det.image_size, det.tile, det.overlap)
    prep = Preprocessing(size=(size, size))  # decoding and resizing only: normalisation is the model's
    out: list[np.ndarray] = []
    for batch in iter_batches(list(images), prep, det.batch_size, det.workers):
        tiles = cut(torch.from_numpy(batch.stacked()).round().clamp_(0, 255).to(torch.uint8), det.image_size,
                    tile_stride(det.image_size, det.overlap))
        out.extend(t.permute(1, 2, 0).numpy().copy() for t in tiles)
    return out


def wrap(det: Any, model: nn.Module) -> nn.Module:
    """The method's model on tiles when ``det`` is tiled (and its preprocessing at the working size)."""
    if not is_tiled(det):
        return model
    size = working_size(det.image_size, det.tile, det.overlap)
    det.preprocessing_ = replace(det.preprocessing_, size=(size, size))
    return TiledModel(model, det.image_size, det.tile, det.overlap)


def unwrap(model: Any) -> Any:
    """The method's own model inside a tiled one (itself otherwise)."""
    return model.inner if isinstance(model, TiledModel) else model


def inner_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tiled model file's tensors named as the method's own model names them (``inner.`` dropped)."""
    return {k.removeprefix("inner."): v for k, v in tensors.items()}


def retile(det: Any, tile: int | None, overlap: float | None) -> None:
    """Work a loaded model on another grid (its method model unchanged): ``tile`` tiles per side (1: none)."""
    from insightad import config

    det.set_params(**{k: v for k, v in (("tile", tile), ("overlap", overlap)) if v is not None})
    config.validate(det)
    if overlap is not None and det.tile == 1:
        raise InsightADError(f"--overlap: applies to tiled work; give --tile N (N > 1) as well (this model works "
                             f"untiled), got --overlap {overlap} alone")
    check_tileable(det)
    inner = unwrap(det.model_)
    det.preprocessing_ = replace(det.preprocessing_, size=(det.image_size, det.image_size))
    det.model_ = wrap(det, inner)
