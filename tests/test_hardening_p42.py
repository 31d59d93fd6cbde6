"""Issue 42: an adversarial pass over ``insightad serve`` (the HTTP API and the operators' page).

Each test failed before its fix and passes after it."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from insightad.data.images import load_image


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_limit_of_one_thread_never_refuses_another_threads_image(monkeypatch):
    """Pillow's pixel limit is one process-wide variable: the decoder set it to each call's own limit around
    its decoding, so a server decoding a batch (whose pixel budget was nearly used) in one decode thread made
    another thread refuse a 40x40 image as 'image too large: more than the limit of 40000000 pixels'."""
    other_opened, release = threading.Event(), threading.Event()
    plain_open = PngImagePlugin.PngImageFile._open
    other = threading.Thread(target=load_image, args=(_png(8), 1), kwargs={"max_pixels": 70})

    def paused_open(self):  # a thread switch just after the 40x40 header is read, before Pillow checks its size
        plain_open(self)
        if self.size == (40, 40):
            other.start()  # another request's image, with a limit of 70 pixels
            other_opened.wait(1)
        elif self.size == (8, 8):
            other_opened.set()
            release.wait(10)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", paused_open)
    try:
        img = load_image(_png(40), 1, max_pixels=40_000_000)  # was: InsightADError 'image too large'
    finally:
        release.set()
        other.join(10)
    assert img.size == (40, 40)


def test_pixel_limit_still_refuses_from_the_header(monkeypatch):
    from insightad.errors import InsightADError

    with pytest.raises(InsightADError, match="image too large: more than the limit of 1599 pixels"):
        load_image(_png(40), 1, max_pixels=1599)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is left as it was
