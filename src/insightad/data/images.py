"""Reading image and mask files: every format the layouts allow, with one-line errors naming the file."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile

from insightad.errors import InsightADError
from insightad.io import IMAGE_EXTENSIONS, is_image_file  # noqa: F401 - re-exported

# What the files hold, as Pillow names it (MPO: the multi-picture JPEG many cameras write). Anything else
# (GIF, WebP, PPM, ICO, ...) is refused, whatever its extension: the README lists these four formats.
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "TIFF": "TIFF"}
ACCEPTED_TEXT = "PNG, JPEG, BMP or TIFF"
# Formats whose files may hold several images (an animated PNG: APNG), refused when they do: every decoder
# (Pillow here, libspng in fast_png) would score the first and pass the others unseen.
MULTI_FRAME_FORMATS = {"TIFF": "a TIFF file", "PNG": "an animated PNG"}
DEFAULT_MAX_PIXELS = 200_000_000  # far above real inspection images, below decompression bombs

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image


def not_scored_note(folder: str | Path, skipped: Sequence[str | Path | bytes], what: str,
                    verb: str = "scored") -> str | None:
    """The one line every command that walks a folder of images prints for the files it passes over by their
    names (``*_mask.*``, other extensions: GIF, WebP, ...), or None when there are none; ``what`` says what
    becomes of them. A file left out is always said, never silently (sort would leave it unsorted)."""
    if not skipped:
        return None
    example = os.path.basename(os.fsdecode(skipped[0]))
    return (f"{os.fsdecode(folder)}: {len(skipped)} files not {verb}, taken for masks or non-images by their names "
            f"(images: {' '.join(IMAGE_EXTENSIONS)}, not *_mask.*), e.g. {example}; {what}")


def no_images_message(folder: str | Path, skipped: Sequence[str | Path | bytes], what: str) -> str:
    """The one line for a folder with nothing to score: which files are images, and, when the folder holds files
    passed over by their names (only ``*_mask.png``, only ``.webp``), how many and what to do (``what``) -- not
    just 'no images found' for a folder full of .png masks."""
    text = f"{os.fsdecode(folder)}: no images found (expected {', '.join(IMAGE_EXTENSIONS)} files, not *_mask.*)"
    if not skipped:
        return text
    example = os.path.basename(os.fsdecode(skipped[0]))
    return f"{text}; {len(skipped)} files passed over by their names, e.g. {example}; {what}"


def other_image_formats(paths: Sequence[Path]) -> list[Path]:
    """The files among ``paths`` named as images of a format InsightAD does not accept (.webp, .gif, .ppm, ...:
    what Pillow registers): in a dataset folder, images someone meant to be used, not notes or model files."""
    Image.init()
    known = {ext.lower() for ext in Image.registered_extensions()}
    return [p for p in paths if p.suffix.lower() in known and p.suffix.lower() not in IMAGE_EXTENSIONS]


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def pillow_unlimited() -> Iterator[None]:
    """Pillow's own pixel limit switched off for what runs inside (callers compare ``img.size`` with their own).
    Pillow's limit is one process-wide variable (``Image.MAX_IMAGE_PIXELS``) and its warnings filters are
    process-wide too, so setting either per call raced between threads: a server decoding two requests at once
    refused a 40x40 image as 'too large' while another thread had lowered the limit for its own image. The
    variable is switched off only under this lock, for a header read or the decoding of an image over it."""
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def over_pillow_limit(img: Image.Image) -> bool:
    """True when decoding ``img`` would meet Pillow's own limit (a TIFF checks it again when loaded)."""
    with _PIL_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and img.size[0] * img.size[1] > limit


def open_unlimited(fp: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open`` (the header only) without Pillow's own pixel limit (``pillow_unlimited``)."""
    with pillow_unlimited():
        return Image.open(fp)


def header_pixels(data: bytes) -> int | None:
    """Width x height of encoded image bytes from their header alone (None when the header cannot be read).
    A PNG's IHDR is read as ``fast_png`` reads it when Pillow refuses the file: libspng decodes some PNGs that
    Pillow cannot identify (a damaged IHDR checksum), and a server counting their pixels as unknown let them
    past its per-request and in-flight pixel limits."""
    try:
        with open_unlimited(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - an unreadable header is reported by whoever decodes the image
        if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
            return None
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return int(w) * int(h)


def _open(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        img = open_unlimited(fp)
        if img.size[0] * img.size[1] > max_pixels:  # from the header, before a pixel is decoded
            img.close()
            raise InsightADError(f"{name}: image too large: more than the limit of {max_pixels} pixels "
                                 "(width x height)")
        if img.format not in ACCEPTED_FORMATS:
            img.close()
            raise InsightADError(f"{name}: {img.format or 'unknown'} images are not accepted (expected "
                                 f"{ACCEPTED_TEXT})")
        # (an MPO JPEG's 2nd frame: a preview)
        frames = getattr(img, "n_frames", 1) if img.format in MULTI_FRAME_FORMATS else 1
        if frames > 1:  # scoring the first page alone would pass the others unseen
            img.close()
            kind, part = MULTI_FRAME_FORMATS[str(img.format)], "page" if img.format == "TIFF" else "frame"
            raise InsightADError(f"{name}: {kind} with {frames} {part}s; expected a single image "
                                 f"(save each {part} as its own file)")
        with pillow_unlimited() if over_pillow_limit(img) else contextlib.nullcontext():
            img.load()
    except FileNotFoundError:
        raise InsightADError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise InsightADError(f"{name}: is a folder, expected an image file") from None
    except Image.UnidentifiedImageError:
        raise InsightADError(f"{name}: not a readable image (expected {ACCEPTED_TEXT})") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).split("\n")[0] or type(e).__name__
        raise InsightADError(f"{name}: unreadable or truncated image ({reason})") from None
    return img


def check_finite(img: Image.Image, name: str) -> None:
    """A floating-point image with NaN or infinite pixels is refused: scaling would turn it into a wrong picture."""
    arr = np.asarray(img)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InsightADError(f"{name}: {bad} of {arr.size} pixel values are NaN or infinite; expected finite numbers")


def to_8bit(img: Image.Image) -> Image.Image:
    """8-bit L or RGB: 16-bit and float images scaled, palettes expanded, alpha dropped."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    return img.convert("RGB")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG = {(0, 1), (0, 3), (0, None), (2, 3), (2, None)}  # (colour type, channels asked): gray or RGB, 8 bits


def _plain_png(data: bytes, max_pixels: int) -> int | None:
    """The colour type (0 gray, 2 RGB) of an 8-bit PNG without transparency and within ``max_pixels``, read
    from its header and the chunks before its pixels; None for any other file."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    if depth != 8 or colour not in (0, 2) or not 0 < width * height <= max_pixels:
        return None
    pos = 8
    while pos + 8 <= len(data):
        kind = data[pos + 4:pos + 8]
        if kind in (b"tRNS", b"acTL"):  # transparency, or an animated PNG (load_image refuses it)
            return None
        if kind == b"IDAT":
            return colour
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return None


def fast_png(source: str | Path | bytes, channels: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """uint8 (H, W, C) pixels of a plain PNG (8-bit gray or RGB, no transparency) decoded by libspng
    (``pyspng``): the same pixels as ``load_image`` gives, in about half the time of Pillow on a 900 px photo.
    None for any other file, a gray image asked of an RGB one (Pillow's luma rounding is its own), or one
    libspng cannot read: ``load_image`` decodes those, and words their errors."""
    try:
        import pyspng
    except ImportError:
        return None
    try:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            with open(source, "rb") as f:  # another format is not read past its first bytes
                data = f.read(len(PNG_SIGNATURE))
                data += f.read() if data == PNG_SIGNATURE else b""
    except OSError:
        return None
    colour = _plain_png(data, max_pixels)
    if colour is None or (colour, channels) not in _PLAIN_PNG:
        return None
    try:
        arr = pyspng.load(data)
    except Exception:  # noqa: BLE001 - damaged or truncated: Pillow says what is wrong with it
        return None
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        return None
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.repeat(arr, 3, axis=2) if channels == 3 and arr.shape[2] == 1 else arr


def load_image(source: str | Path | bytes, channels: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully into an 8-bit image; ``channels`` 3 gives RGB, 1 gives grayscale, None keeps it."""
    img = _open(source, max_pixels)
    if img.mode == "F":
        check_finite(img, "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source))
    img = to_8bit(img)
    if channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    elif channels == 1 and img.mode != "L":
        img = img.convert("L")
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the file's header, without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).split("\n")[0] or type(e).__name__
        raise InsightADError(f"{path}: unreadable image ({reason})") from None


def check_mask_size(mask: str | Path, image: str | Path) -> None:
    """A mask must have its image's size: one line naming both files otherwise."""
    (mw, mh), (iw, ih) = image_size(mask), image_size(image)
    if (mw, mh) != (iw, ih):
        raise InsightADError(f"{mask}: mask is {mw}x{mh} but the image of {image} is {iw}x{ih}; "
                             "a mask must match its image's size")


def load_mask(path: str | Path, size: tuple[int, int] | None = None, image_path: str | Path | None = None) -> np.ndarray:
    """Boolean defect mask (any non-zero value is a defect); ``size`` is the image's (width, height)."""
    img = _open(path, DEFAULT_MAX_PIXELS)
    if size is not None and img.size != tuple(size):
        of = f" of {image_path}" if image_path else ""
        raise InsightADError(f"{path}: mask is {img.size[0]}x{img.size[1]} but the image{of} is "
                             f"{size[0]}x{size[1]}; a mask must match its image's size")
    wide = _wide_colour_png(path) if img.format == "PNG" else None
    return _colour_marks(wide, wide.shape[2] == 4) if wide is not None else mask_pixels(img, str(path))


def _wide_colour_png(path: str | Path) -> np.ndarray | None:
    """The pixels of a PNG of 16 bits per colour channel (RGB or RGBA) as libspng decodes them, or None for any other
    file: Pillow reads such a file as 8 bits a channel, so a colour mask of label 1 became all 0."""
    with open(path, "rb") as f:
        head = f.read(26)
        if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR" or len(head) < 26 or head[24] != 16 \
                or head[25] not in (2, 6):
            return None
        data = head + f.read()
    import pyspng

    arr = np.asarray(pyspng.load(data))
    return arr if arr.ndim == 3 and arr.shape[2] in (3, 4) else None


def _colour_marks(arr: np.ndarray, alpha: bool) -> np.ndarray:
    """Where any colour channel of (H, W, 3 or 4) pixels is non-zero; with ``alpha``, only where not transparent."""
    marked: np.ndarray = np.any(arr[..., :3] != 0, axis=2)
    return marked & (arr[..., 3] > 0) if alpha else marked


def mask_pixels(img: Image.Image, name: str) -> np.ndarray:
    """Where a mask image marks a defect: any non-zero value. Gray masks of more than 8 bits are read from their
    own values (a 16-bit mask of label 1, or a 32-bit or float mask of one constant value, scaled to 8 bits was
    all 0). Colour and palette masks: wherever any colour channel is non-zero (palettes through their RGB
    colours); their luma lost dark marks (RGB (1, 0, 0), a dark blue: luma 0). Masks with transparency (RGBA, LA,
    a palette with a transparent entry, as annotation tools write them): a fully transparent pixel is never a
    defect, whatever colour it holds (editors keep white or old colours under alpha 0); alpha is not otherwise
    read, so an opaque black background is defect-free. (``load_mask`` reads 16-bit colour PNGs at 16 bits.)"""
    if img.mode == "F":
        check_finite(img, name)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return np.asarray(img) != 0
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L")) > 0
    with_alpha = "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info
    return _colour_marks(np.asarray(img.convert("RGBA" if with_alpha else "RGB")), with_alpha)
