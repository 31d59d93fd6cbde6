"""Request payloads to model-ready tensors, and anomaly maps to colour PNGs: the server's byte-level I/O.

Decoding is the CLI's own (the scorer's ``load_input``, with this server's pixel limit), so a served score
equals ``insightad predict``'s for the same image file. Every failure is an ``InsightADError`` with a
one-line message naming the field, which the app answers with 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from insightad.data.images import header_pixels
from insightad.errors import InsightADError
from insightad.render.colormap import MapScale, colorize
from insightad.scoring import Scorer

_DATA_URL = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)  # any media type and parameters
_WHITESPACE = re.compile(r"\s+")


@dataclass
class DecodedImage:
    """A request image as the scorer's engine takes it (C, H, W) and its original (height, width)."""

    pixels: np.ndarray
    size: tuple[int, int]


def decode_base64(text: str, field: str = "image") -> bytes:
    """Standard or URL-safe base64 (line breaks, missing padding and a ``data:`` URL prefix allowed)."""
    try:  # the common case, without copying the (large) string
        data = base64.b64decode(text, validate=True)
        if data:
            return data
    except (binascii.Error, ValueError):
        pass
    text = _WHITESPACE.sub("", strip_data_url(text, field))
    if not text:
        raise InsightADError(f"{field}: empty; expected the base64 of an encoded image (PNG, JPEG, BMP or TIFF)")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        named = named_not_sent(text)  # a URL or a file name: it was 'not valid base64', which sent people to their encoder
        raise InsightADError(f"{field}: {named}" if named else f"{field}: not valid base64 (expected the base64 of an "
                             "encoded image file)") from None
    if not data:
        raise InsightADError(f"{field}: base64 decodes to nothing; expected an encoded image")
    return data


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|~|\.{1,2}[\\/]|/|\\\\)|\.(?:png|jpe?g|bmp|tiff?|gif|webp)$", re.IGNORECASE)


def named_not_sent(text: str) -> str | None:
    """What to say when the image field, not valid base64, holds a URL or a file name instead of the file's bytes."""
    text = text.strip()
    if len(text) > 1024:
        return None
    if _URL.match(text):
        return "a URL, not base64: this server fetches nothing; send the base64 of the image file's bytes"
    if _PATH.search(text) and any(c in text for c in ".~\\:"):  # a character base64 never has ('/9j/' opens JPEGs)
        return ("a file name or path, not base64: this server reads no files by name; send the base64 of the file's "
                "bytes ($(base64 -w0 part.png) in a shell)")
    return None


def strip_data_url(text: str, field: str) -> str:
    """``text`` without a ``data:...;base64,`` prefix (spaces or a line break before it allowed, as before the
    base64 itself: such a prefix was left in and the image called 'not valid base64'). A ``data:`` URL that is
    not base64 (percent-encoded bytes) is refused saying so."""
    head = text[:200].lstrip()
    if head[:5].lower() != "data:":
        return text
    rest = _DATA_URL.sub("", head, count=1)
    if rest == head:
        raise InsightADError(f"{field}: a data: URL without ';base64,'; expected data:<type>;base64,<the base64 of "
                             "an encoded image>")
    return rest + text[200:]


def decode_image(data: bytes, det: Scorer, max_pixels: int, field: str = "image") -> DecodedImage:
    """Encoded image bytes -> the model's input, refusing images over ``max_pixels`` before decoding them."""
    pixels = header_pixels(data)
    if pixels is not None and pixels > max_pixels:
        raise InsightADError(f"{field}: image has {pixels} pixels, over this server's limit of {max_pixels} "
                             "(--max-pixels); send a smaller image")
    try:
        return DecodedImage(*det.load_input(data, max_pixels))
    except InsightADError as e:
        raise InsightADError(f"{field}: {encoded_twice(data, field == 'file') or str(e).removeprefix('<bytes>: ')}") from None


_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")


def encoded_twice(data: bytes, uploaded: bool = False) -> str | None:
    """What to say when ``data``, not an image, is itself text that holds one: the base64 of the base64 of the
    file, or of a ``data:`` URL (a client that encoded its string again), or an ``uploaded`` text file holding
    either. It was 'not a readable image', which sent people looking at the image file."""
    head = data[:200].lstrip()
    if uploaded:
        said = "a text file holding a data: URL or base64, not the image file; upload the image file itself"
        return said if head[:5].lower() == b"data:" or encoded_twice(data) else None
    if head[:5].lower() == b"data:":
        return ("the base64 of a data: URL, so encoded twice; send the data: URL itself or the base64 of the file's "
                "bytes")
    if not holds_base64_image(data):
        return None
    return "the base64 of base64 text, so encoded twice; send the base64 of the file's bytes once"


def holds_base64_image(data: bytes) -> bool:
    """Whether ``data`` is base64 text (standard or URL-safe, line breaks allowed) of an image file; its first
    4 KB are looked at, enough for the image's header."""
    if not _BASE64_TEXT.fullmatch(data[:4096]):
        return False
    text = _WHITESPACE.sub("", data[:4096].decode("ascii")).replace("-", "+").replace("_", "/").rstrip("=")
    try:
        inner = base64.b64decode(text[:len(text) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        return False
    return header_pixels(inner) is not None


MAX_HEATMAP_SIDE = 1024  # a heatmap in an answer is at most this many pixels on its long side


def heatmap_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the heatmap answered for an image of this size: its own, or at most
    ``MAX_HEATMAP_SIDE`` on the long side. The model-size map is brought to it in one resize: bringing it to
    a 6000 px image's size first and shrinking that took 3.5 s instead of 0.8 and 750 MB more."""
    f = min(1.0, MAX_HEATMAP_SIDE / max(height, width))
    return (max(1, round(height * f)), max(1, round(width * f))) if f < 1.0 else (height, width)


def heatmap_png(amap: np.ndarray, scale: MapScale) -> str:
    """An anomaly map -> base64 RGBA PNG in the one colour convention (alpha grows with the value, so it
    lays over the image as an overlay) (``render.colormap``), at the
    input's size but at most ``MAX_HEATMAP_SIDE`` on its long side (answers stay small)."""
    amap = np.asarray(amap, dtype=np.float32)
    h, w = heatmap_size(*amap.shape)
    img = Image.fromarray(colorize(amap, scale, alpha=True), mode="RGBA")
    if (h, w) != amap.shape:
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
