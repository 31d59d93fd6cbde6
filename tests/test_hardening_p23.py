"""Issue 12 point 23: a config key no option takes is an error naming it and the closest valid key;
``--config`` of a missing file is an error for every command, info included."""

from __future__ import annotations

from insightad.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_p23_unknown_flat_key_names_the_closest(folder_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("imagesize = 256\n")
    code, _, err = _run(capsys, "train", "--config", cfg, "--data", folder_dir, "--out", tmp_path / "m.safetensors")
    assert code == 1 and "'imagesize'" in err and "did you mean 'image_size'" in err and str(cfg) in err
    assert not (tmp_path / "m.safetensors").exists()


def test_p23_unknown_section_key_names_the_closest(baseline_model, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[predict]\nthreshhold = 1.0\n")
    code, _, err = _run(capsys, "predict", "--config", cfg, "--model", baseline_model, "x.png")
    assert code == 1 and "'threshhold'" in err and "did you mean 'threshold'" in err


def test_p23_flat_key_of_another_command_is_fine(baseline_model, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("holdout = 0.3\nport = 9000\n")  # train's and serve's keys: shared file, fine for info
    code, _, err = _run(capsys, "info", "--config", cfg, "--model", baseline_model)
    assert code == 0, err


def test_p23_info_config_missing(baseline_model, tmp_path, capsys):
    code, _, err = _run(capsys, "info", "--config", tmp_path / "missing.toml", "--model", baseline_model)
    assert code == 1 and "missing.toml" in err and "not found" in err


def test_p23_alias_key_sets_its_option(folder_dir, tmp_path, capsys):
    import argparse

    from insightad.cli import build_parser
    from insightad.cli.options import option_keys

    top = build_parser(["train"])
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    keys = option_keys(sub)
    assert keys["mode"] == "method" and keys["image_size"] == "image_size" and keys["data_path"] == "data"
