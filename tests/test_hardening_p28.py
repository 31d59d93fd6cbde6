"""Issue 12 point 28: one convention on every sheet: the frame says right (green) or wrong (red), the label
says the verdict; the legend never mentions a magenta mask that is not drawn."""

from __future__ import annotations

import numpy as np
from PIL import Image

from insightad.render.overlay import ANOMALOUS_RGB, NORMAL_RGB, RIGHT_RGB, WRONG_RGB, render_overlay


def _frame_colour(img: Image.Image) -> tuple[int, ...]:
    arr = np.asarray(img)
    return tuple(int(v) for v in arr[-1, arr.shape[1] // 2])  # bottom edge: the frame


def test_p28_frame_says_right_or_wrong():
    img = Image.new("RGB", (128, 128), (90, 90, 90))
    # a false negative (defect called normal): wrong -> red frame, even though the verdict is "normal"
    fn = render_overlay(img, score=0.1, threshold=0.5, correct=False)
    assert _frame_colour(fn) == WRONG_RGB
    # a true positive: right -> green frame, though the verdict is ANOMALOUS
    tp = render_overlay(img, score=0.9, threshold=0.5, correct=True)
    assert _frame_colour(tp) == RIGHT_RGB
    # no truth known (predict overlays): the frame keeps the verdict colour
    assert _frame_colour(render_overlay(img, score=0.9, threshold=0.5)) == ANOMALOUS_RGB
    assert _frame_colour(render_overlay(img, score=0.1, threshold=0.5)) == NORMAL_RGB


def test_p28_worst_cases_legend_without_masks(baseline_model, crack_dir, tmp_path, monkeypatch):
    """A crack set has no masks: the footer must not mention magenta; it states the frame convention."""
    from insightad.config import DataParams
    from insightad.evaluate import plots, report
    from insightad.evaluate.run import evaluate_model
    from insightad.inference.load import load_for_inference

    seen = {}

    def capture(tiles, path, title, cols=4, footer=None):
        seen["footer"] = footer
        return path

    monkeypatch.setattr(plots, "image_sheet", capture)
    det = load_for_inference(baseline_model, "torch")
    ev = evaluate_model(det, crack_dir, DataParams(), progress=False)
    report.worst_cases(det, ev, tmp_path)
    assert "magenta" not in seen["footer"] and "green = right, red = wrong" in seen["footer"]
