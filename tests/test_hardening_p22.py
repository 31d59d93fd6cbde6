"""Issue 12 point 22: --threshold nan/inf and --prevalence outside (0, 1) are refused with one line."""

from __future__ import annotations

import json

import pytest

from insightad.cli import main


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_p22_threshold_nan_inf_refused(baseline_model, mvtec_dir, value, capsys):
    image = next((mvtec_dir / "test" / "good").iterdir())
    code = main(["predict", "--model", str(baseline_model), f"--threshold={value}", str(image)])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "--threshold" in err and "finite" in err and err.count("\n") == 1


def test_p22_threshold_json_nan_refused(baseline_model, mvtec_dir, tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"threshold": float("nan")}))
    image = next((mvtec_dir / "test" / "good").iterdir())
    code = main(["predict", "--model", str(baseline_model), "--threshold", str(f), str(image)])
    err = capsys.readouterr().err
    assert code == 1 and str(f) in err and "finite" in err


@pytest.mark.parametrize("value", ["1.5", "0", "1", "-0.1", "nan"])
def test_p22_prevalence_out_of_range_refused(baseline_model, mvtec_dir, value, capsys):
    code = main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), f"--prevalence={value}"])
    err = capsys.readouterr().err
    assert code == 1 and "--prevalence" in err and err.count("\n") == 1
