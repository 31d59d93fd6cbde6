"""Hardening p32: sort and batch resume by file identity (a new file under a sorted name, an error tried
again), sort's exit status, config-file checks, empty list params."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from insightad.apps.sort import CSV_NAME
from insightad.cli import main


def _sort(model: Path, src: Path, out: Path, *extra: str) -> int:
    return main(["sort", "--model", str(model), "--input", str(src), "--out", str(out), "--move", *extra])


def test_p32_sort_sorts_a_new_file_that_took_a_sorted_name(baseline_model, mvtec_dir, tmp_path, capsys):
    src, out = tmp_path / "inc", tmp_path / "out"
    src.mkdir()
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", src / "a.png")
    assert _sort(baseline_model, src, out) == 0
    shutil.copy(mvtec_dir / "test" / "crack" / "000.png", src / "a.png")  # a new image, same name
    capsys.readouterr()
    assert _sort(baseline_model, src, out) == 0
    text = capsys.readouterr().out
    assert not (src / "a.png").exists() and "replaced an earlier sorted file" in text
    assert "skipped" not in text
    assert len(list(out.rglob("a*.png"))) == 2  # both images, neither overwritten


def test_p32_sort_retries_an_unreadable_image_and_exits_1(baseline_model, mvtec_dir, tmp_path, capsys):
    src, out = tmp_path / "inc", tmp_path / "out"
    src.mkdir()
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", src / "g.png")
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert _sort(baseline_model, src, out) == 1  # unreadable: exit 1, after sorting the other
    err = capsys.readouterr().err
    assert "1 images could not be read" in err and not (src / "g.png").exists()
    shutil.copy(mvtec_dir / "test" / "good" / "001.png", src / "b.png")  # replaced by a good one
    assert _sort(baseline_model, src, out) == 0
    assert "tried again 1 images" in capsys.readouterr().out
    assert not (src / "b.png").exists()
    rows = (out / CSV_NAME).read_text().splitlines()
    assert rows[0].endswith(",size,mtime_ns") and rows[-1].split(",")[4] in ("normal", "anomalous")


def test_p32_sort_copy_skips_unchanged_and_resorts_a_changed_file(baseline_model, mvtec_dir, tmp_path, capsys):
    src, out = tmp_path / "inc", tmp_path / "out"
    src.mkdir()
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", src / "a.png")
    shutil.copy(mvtec_dir / "test" / "good" / "001.png", src / "b.png")
    args = ["sort", "--model", str(baseline_model), "--input", str(src), "--out", str(out), "--json"]
    assert main(args) == 0
    capsys.readouterr()
    shutil.copy(mvtec_dir / "test" / "crack" / "000.png", src / "b.png")
    st = os.stat(src / "b.png")
    os.utime(src / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a distinct mtime on any file system
    assert main(args) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    assert (got["skipped"], got["changed"], got["retried"]) == (1, 1, 0)


def test_p32_batch_retries_an_error_row_once_the_file_appears(baseline_model, mvtec_dir, tmp_path, capsys):
    listed = tmp_path / "late.png"
    (tmp_path / "paths.txt").write_text(f"{listed}\n")
    out = tmp_path / "r.parquet"
    args = ["batch", "--model", str(baseline_model), "--input", str(tmp_path / "paths.txt"), "--out", str(out),
            "--engine", "torch"]
    assert main(args) == 1 and "file not found" in capsys.readouterr().err
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", listed)
    assert main(args) == 0
    assert "1 error rows tried again" in capsys.readouterr().out
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["size"] == listed.stat().st_size
    shutil.copy(mvtec_dir / "test" / "crack" / "000.png", listed)  # another image under the name
    st = listed.stat()
    os.utime(listed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    main(args)
    assert "1 changed since" in capsys.readouterr().out
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1 and rows[0]["mtime_ns"] == listed.stat().st_mtime_ns  # the newest row replaced it


@pytest.mark.parametrize("toml,message", [
    (None, "expects a TOML file, got a folder"),
    ('[trian]\nimage_size = 64\n', "unknown table [trian]; did you mean [train]?"),
    ('[predict]\njson = "no"\n', "key 'json': expected a TOML boolean"),
    ('[train]\nimage_size = "big"\n', "key 'image_size': expected an integer, got 'big'"),
])
def test_p32_bad_config_files_are_one_line(baseline_model, mvtec_dir, tmp_path, capsys, toml, message):
    cfg = tmp_path / "c.toml"
    if toml is None:
        cfg.mkdir()
    else:
        cfg.write_text(toml)
    argv = (["train", "--data", str(mvtec_dir), "--out", str(tmp_path / "t.safetensors")] if "train" in (toml or "")
            else ["predict", "--model", str(baseline_model), str(tmp_path)])
    rc = main([argv[0], "--config", str(cfg), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and str(cfg) in err
    assert "Traceback" not in err and "usage:" not in err and len(err.strip().splitlines()) == 1


def test_p32_required_flags_can_come_from_the_config_file(baseline_model, mvtec_dir, tmp_path, capsys):
    src = tmp_path / "inc"
    src.mkdir()
    shutil.copy(mvtec_dir / "test" / "good" / "000.png", src / "a.png")
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[sort]\nmodel = "{baseline_model}"\ninput = "{src}"\nout = "{tmp_path / "out"}"\n')
    assert main(["sort", "--config", str(cfg)]) == 0
    assert (tmp_path / "out" / CSV_NAME).exists()
    cfg.write_text(f'[sort]\ninput = "{src}"\n')
    assert main(["sort", "--config", str(cfg)]) == 1
    assert "--model: required" in capsys.readouterr().err


def test_p32_empty_list_params_are_refused(mvtec_dir, tmp_path, capsys):
    from insightad.methods.baseline import BaselineParams
    from insightad.methods.svdd import SVDDParams

    rc = main(["train", "--method", "baseline", "--data", str(mvtec_dir), "--image-size", "32", "--layers", "",
               "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "layers: expected at least 1 item, got an empty list" in err and "Traceback" not in err
    assert not (tmp_path / "t.safetensors").exists()
    with pytest.raises(Exception, match="layers: expected at least 1 item"):
        BaselineParams(layers=[])
    assert SVDDParams(hidden=[]).hidden == []  # empty means one linear map: still allowed


def test_p32_chunked_body_too_large_says_how_large():
    from insightad.apps.serve.limits import BodyTooLarge, describe_limit

    detail = BodyTooLarge(1 << 20).detail  # a chunked body: its size is unknown when it is cut off
    assert "too large: more;" not in detail and f"more than {describe_limit(1 << 20)}" in detail
