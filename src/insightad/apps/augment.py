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
from insightad.outputs import check_not_input

SAVE_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def image_seed(seed: int, rel: str, copy: int) -> int:
    """A per-image, per-copy seed that does not depend on the order files are listed in."""
    name = rel.encode("utf-8", "surrogateescape")  # a file name that is not UTF-8: its own bytes
    return (seed * 1_000_003 + zlib.crc32(name) * 131 + copy) % (2**63)


def check_decodes(images: list[Path], progress: bool = False) -> None:
    """Every input decodes before anything is written: a bad file found halfway would leave half an output."""
    for path in tqdm(images, desc="check", unit="image", disable=not progress):
        try:
            load_image(path)
        except InsightADError as e:
            raise InsightADError(f"{e}; nothing was written (remove or fix it, then run again)") from None


def augment_folder(src: str | Path, out: str | Path, copies: int, params: AugmentParams, seed: int = 0,
                   include_originals: bool = False, progress: bool = False) -> list[Path]:
    """Write ``copies`` augmented versions of every image under ``src`` into ``out`` (same sub-folders);
    with ``include_originals`` the originals are copied beside them byte for byte (same names)."""
    from insightad.io import atomic_write, durable_copy, folder_lock

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InsightADError(f"{src}: expected a folder of images")
    if copies < 1:
        raise InsightADError(f"copies: expected a positive number, got {copies}")
    check_not_input(out, "--out", [src])
    images = list_images(src)
    if not images:
        raise InsightADError(f"{src}: no images found (expected .png, .jpg, .jpeg, .bmp, .tif or .tiff files)")
    check_decodes(images, progress)
    check_room(images, out, copies + int(include_originals))
    plan = plan_names([p.relative_to(src) for p in images], copies, include_originals)
    written: list[Path] = []
    # Two runs on one --out (other seeds, other transformations) wrote the same names: the folder ended up a mix
    # of both, each run saying it wrote every file. The second is refused at once.
    with folder_lock(out, "insightad augment"):
        for path, (original, targets) in tqdm(zip(images, plan), total=len(images), desc="augment", unit="image",
                                              disable=not progress):
            rel = path.relative_to(src)
            img = load_image(path)
            fmt = SAVE_FORMAT.get(path.suffix.lower(), "PNG")
            if original is not None:  # a copy, not a re-encoding: 16-bit, CMYK and JPEG bytes stay as they were
                durable_copy(path, out / original)
                written.append(out / original)
            for k, target in enumerate(targets):
                atomic_write(out / target, partial(augment(img, params, image_seed(seed, rel.as_posix(), k)).save,
                                                   format=fmt))
                written.append(out / target)
    return written


def check_room(images: list[Path], out: Path, per_image: int) -> None:
    """Refuse, before anything is written, a run whose files would not fit on ``out``'s disk (estimated at each
    input file's own size per output: a typo such as --copies 5000 filled the disk and stopped half way)."""
    import shutil

    need = per_image * sum(p.stat().st_size for p in images)
    where = next((p for p in [out, *out.parents] if p.exists()), out)
    free = shutil.disk_usage(where).free
    if need > free:
        raise InsightADError(f"--copies: {per_image} files for each of {len(images)} images would write about "
                             f"{need / 1e9:.2f} GB into {out}, which has {free / 1e9:.2f} GB free; ask for fewer "
                             "copies or choose another --out")


def plan_names(rels: list[Path], copies: int, include_originals: bool) -> list[tuple[Path | None, list[Path]]]:
    """Every output name, before anything is written: per image its original's name (or None) and its
    copies' ``<stem>_augNNN<ext>``. Originals keep their names; a copy whose name is taken (an original
    called ``x_aug000.png``) gets ``_2``, ``_3``... so that no file overwrites another."""
    used = {r.as_posix().casefold() for r in rels} if include_originals else set()
    plan: list[tuple[Path | None, list[Path]]] = []
    for rel in rels:
        targets = []
        for k in range(copies):
            base, n = f"{rel.stem}_aug{k:03d}", 2
            name = rel.parent / f"{base}{rel.suffix}"
            while name.as_posix().casefold() in used:
                name = rel.parent / f"{base}_{n}{rel.suffix}"
                n += 1
            used.add(name.as_posix().casefold())
            targets.append(name)
        plan.append((rel if include_originals else None, targets))
    return plan
