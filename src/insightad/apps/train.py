"""Train: discover the data, split off held-out normals, fit a detector, write its model file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from insightad.config import DataParams
from insightad.data.layouts import Dataset, discover, holdout_split
from insightad.methods import Detector, create_detector
from insightad.model_file import save_model


def default_model_path(data: Path, method: str) -> Path:
    return Path("models") / f"{Path(data).resolve().name}-{method}.safetensors"


def split_record(ds: Dataset, train: list, held: list, dp: DataParams) -> dict[str, Any]:
    """What the model file keeps about its training data: exactly which files, and which were held out."""
    return {"root": str(ds.root), "layout": ds.layout, "holdout_fraction": 0.0 if ds.has_test_split else dp.holdout,
            "seed": dp.seed, "train": [ds.rel(s.path) for s in train], "holdout": [ds.rel(s.path) for s in held]}


def train_model(data: str | Path, method: str, params: dict[str, Any], dp: DataParams,
                out: str | Path | None = None, progress: bool = True) -> tuple[Detector, Path, dict]:
    """Fit ``method`` on the normal training images of ``data``; returns (detector, model path, split)."""
    ds = discover(data, dp.layout, dp.normal_dir, dp.abnormal_dir)
    train, held = holdout_split(ds, dp.holdout, dp.seed)
    det = create_detector(method, **params)
    det.fit([s.path for s in train], progress=progress)
    det.split_ = split_record(ds, train, held, dp)
    path = save_model(det, out or default_model_path(ds.root, method))
    return det, path, det.split_
