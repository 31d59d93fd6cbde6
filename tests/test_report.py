"""evaluate --report: every file, the numbers in them, the resampled reports, map methods, bad flags."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from insightad.cli import main
from insightad.evaluate.report import per_defect_rows, resampled_report
from tests.mapdetector import map_model  # noqa: F401  (fixture)

PNGS = ("roc_curve.png", "pr_curve.png", "score_histogram.png", "per_defect_scores.png", "balanced_unbalanced.png",
        "worst_cases.png")


def test_report_files_and_numbers(baseline_model, mvtec_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--report", str(out),
                 "--draws", "4"]) == 0
    printed = capsys.readouterr().out
    assert "[Balanced] 8 normal + 8 defective, 4 draws: auc=" in printed and "[Unbalanced] 8 normal + 1" in printed
    for name in PNGS:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) >= 400
    rep = json.loads((out / "metrics.json").read_text())
    m = rep["metrics"]
    assert m["n_normal"] == 8 and m["n_anomalous"] == 16 and 0.5 <= m["image_auroc"] <= 1
    assert rep["pixel"] == {"available": False, "reason": "image-level method: no maps"}
    assert rep["balanced"]["n_normal"] == rep["balanced"]["n_anomalous"] == 8 and rep["balanced"]["draws"] == 4
    assert set(rep["balanced"]["mean"]) == {"auc", "accuracy", "precision", "recall", "f1"}
    # the per-defect CSV matches the scores the model gives
    rows = list(csv.DictReader((out / "per_defect.csv").open()))
    assert [r["defect"] for r in rows] == ["good", "blob", "crack", "missing", "scratch"]
    from insightad.model_file import load_model

    det = load_model(baseline_model)
    blob = det.predict(sorted((mvtec_dir / "test" / "blob").glob("*.png")), maps=False).scores
    r = rows[1]
    assert int(r["count"]) == 4 and float(r["mean"]) == pytest.approx(blob.mean(), rel=1e-4)
    assert float(r["std"]) == pytest.approx(blob.std(ddof=1), rel=1e-3)
    assert float(r["detection_rate"]) == pytest.approx((blob > m["threshold"]).mean())
    md = (out / "per_defect.md").read_text()
    assert md.startswith("| defect type | count | mean score |") and "| blob | 4 |" in md
    report_md = (out / "report.md").read_text()
    assert "![worst_cases](worst_cases.png)" in report_md and "± " in report_md


def test_resampled_report_sizes_and_seeding():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60, bool), np.ones(30, bool)]
    s = np.r_[rng.normal(0, 1, 60), rng.normal(2, 1, 30)]
    b = resampled_report(y, s, 1.0, "balanced", draws=10, seed=3)
    assert (b["n_normal"], b["n_anomalous"]) == (30, 30) and b["std"]["auc"] > 0
    u = resampled_report(y, s, 1.0, "unbalanced", prevalence=0.05, draws=10, seed=3)
    assert (u["n_normal"], u["n_anomalous"]) == (60, 3) and u["prevalence"] == pytest.approx(3 / 63)
    assert resampled_report(y, s, 1.0, "unbalanced", prevalence=0.05, draws=10, seed=3) == u  # seeded
    assert resampled_report(y, s, 1.0, "unbalanced", prevalence=0.05, draws=10, seed=4) != u
    few = resampled_report(y, s, 1.0, "unbalanced", prevalence=0.6, draws=2)
    assert few["n_anomalous"] == 30 and "only 30 defective images" in few["note"]
    assert resampled_report(np.zeros(5, bool), np.arange(5.0), 1.0, "balanced")["available"] is False


def test_per_defect_rows():
    rows = per_defect_rows(["scratch", "good", "good", "scratch", "scratch"], np.array([3.0, 1.0, 2.0, 5.0, 7.0]), 4.0)
    assert rows[0] == {"defect": "good", "count": 2, "mean": 1.5, "std": pytest.approx(0.7071, rel=1e-3),
                       "min": 1.0, "max": 2.0, "detection_rate": 0.0}
    assert rows[1]["detection_rate"] == pytest.approx(2 / 3) and rows[1]["std"] == 2.0


def test_map_method_report(map_model, mvtec_dir, tmp_path):
    out = tmp_path / "r"
    assert main(["evaluate", "--model", str(map_model), "--data", str(mvtec_dir), "--report", str(out),
                 "--prevalence", "0.2", "--draws", "3"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    try:
        import insightad.evaluate.pixel  # noqa: F401
        assert "pixel_auroc" in rep["pixel"]
    except ImportError:
        assert "pixel metrics unavailable" in rep["pixel"]["reason"]
    assert rep["unbalanced"]["n_anomalous"] == 2  # 0.2 / 0.8 * 8
    with Image.open(out / "worst_cases.png") as im:
        assert im.size[0] > 800


@pytest.mark.parametrize("flags,message", [(["--prevalence", "1.5"], "--prevalence: expected a value between 0 and 1"),
                                           (["--draws", "0"], "--draws: expected 1 to 10000, got 0")])
def test_bad_report_flags(baseline_model, mvtec_dir, tmp_path, capsys, flags, message):
    code = main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--report", str(tmp_path / "r"),
                 *flags])
    assert code == 1 and message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_report_into_a_file_is_refused(baseline_model, mvtec_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--report", str(f)]) == 1
    assert "--report expects a folder" in capsys.readouterr().err


def test_report_with_a_threshold_no_image_passes(baseline_model, mvtec_dir, tmp_path, capsys):
    """A threshold above every score leaves precision undefined in every draw: the report says n/a instead of
    failing (it raised a TypeError on a real crack model whose conservative threshold flagged no image in
    some unbalanced draws)."""
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--report", str(out),
                 "--draws", "3", "--threshold", "1e9"]) == 0
    assert "precision=n/a" in capsys.readouterr().out
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["unbalanced"]["mean"]["precision"] is None and rep["unbalanced"]["undefined_draws"]["precision"] == 3
    assert rep["unbalanced"]["mean"]["recall"] == 0.0
    assert "| n/a |" in (out / "report.md").read_text() and (out / "balanced_unbalanced.png").is_file()


def test_resampled_metric_undefined_in_some_draws():
    y = np.array([0] * 20 + [1] * 20, bool)
    s = np.r_[np.zeros(20), np.linspace(0, 2, 20)]  # half of the defective images above the threshold 1.0
    u = resampled_report(y, s, 1.0, "unbalanced", prevalence=0.05, draws=10, seed=0)  # one defective image a draw
    k = u["undefined_draws"]["precision"]
    assert 0 < k < 10 and u["mean"]["precision"] == 1.0  # averaged over the draws where it is defined
