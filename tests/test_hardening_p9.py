"""Issue 12 point 9: predict on a folder scores every readable image, lists the unreadable ones, exits non-zero."""

from __future__ import annotations

import json

from insightad.cli import main


def _folder(mvtec_dir, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    good = sorted((mvtec_dir / "test" / "good").iterdir())[:2]
    (src / "a.png").write_bytes(good[0].read_bytes())
    (src / "b_broken.png").write_bytes(b"this is not a png")
    (src / "c.png").write_bytes(good[1].read_bytes())
    return src


def test_p9_predict_folder_json_scores_the_rest(baseline_model, mvtec_dir, tmp_path, capsys):
    src = _folder(mvtec_dir, tmp_path)
    code = main(["predict", "--model", str(baseline_model), "--engine", "torch", "--json", str(src)])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(rows) == 3
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["b_broken.png"]["anomalous"] is None and "b_broken.png" in by_name["b_broken.png"]["error"]
    assert isinstance(by_name["a.png"]["score"], float) and isinstance(by_name["c.png"]["anomalous"], bool)
    assert "b_broken.png" in err and "1 of 3 images could not be scored" in err


def test_p9_predict_folder_table_and_overlays(baseline_model, mvtec_dir, tmp_path, capsys):
    src = _folder(mvtec_dir, tmp_path)
    code = main(["predict", "--model", str(baseline_model), "--engine", "torch", str(src),
                 "--overlay", str(tmp_path / "ov")])
    out, err = capsys.readouterr()
    assert code == 1 and "ERROR" in out and "2 overlays written" in out and "b_broken.png" in err
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
