"""Enlarge a folder of normal images with augmented copies, written atomically, deterministic by seed."""

from __future__ import annotations

import zlib
from functools import partial
from pathlib import Path

from tqdm import tqdm

from insightad.config import AugmentParams
from insightad.data.augment import augment
from insightad.data.images import load_image
from insightad.errors import InsightADError
from insightad.io import list_images

SAVE_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def image_seed(seed: int, rel: str, copy: int) -> int:
    """A per-image, per-copy seed that does not depend on the order files are listed in."""
    return (seed * 1_000_003 + zlib.crc32(rel.encode()) * 131 + copy) % (2**63)


def augment_folder(src: str | Path, out: str | Path, copies: int, params: AugmentParams, seed: int = 0,
                   include_originals: bool = False, progress: bool = False) -> list[Path]:
    """Write ``copies`` augmented versions of every image under ``src`` into ``out`` (same sub-folders)."""
    from insightad.io import atomic_write

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InsightADError(f"{src}: expected a folder of images")
    if copies < 1:
        raise InsightADError(f"copies: expected a positive number, got {copies}")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InsightADError(f"{out}: the output folder must not be inside the input folder {src}")
    images = list_images(src)
    if not images:
        raise InsightADError(f"{src}: no images found (expected .png, .jpg, .jpeg, .bmp, .tif or .tiff files)")
    written: list[Path] = []
    for path in tqdm(images, desc="augment", unit="image", disable=not progress):
        rel = path.relative_to(src)
        img = load_image(path)
        fmt = SAVE_FORMAT.get(path.suffix.lower(), "PNG")
        targets = [(out / rel, img)] if include_originals else []
        for k in range(copies):
            targets.append((out / rel.parent / f"{rel.stem}_aug{k:03d}{path.suffix}",
                            augment(img, params, image_seed(seed, rel.as_posix(), k))))
        for target, im in targets:
            atomic_write(target, partial(im.save, format=fmt))
            written.append(target)
    return written
