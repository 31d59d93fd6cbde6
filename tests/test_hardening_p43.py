"""Hardening, round 43: backbone levels by module name on the command line, as the README says."""

from __future__ import annotations

import pytest

from insightad.cli import main


def test_p43_layers_take_module_names_on_the_command_line(mvtec_dir, tmp_path, capsys):
    """``--layers blocks.2,blocks.4`` (the README: numbers or module names) trains like a config file's names; a
    name the backbone lacks is refused naming what it has, and a malformed item is still an argparse error."""
    out = tmp_path / "m.safetensors"
    assert main(["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--layers",
                 "blocks.2,blocks.4", "--out", str(out), "--no-onnx"]) == 0, capsys.readouterr().err
    from insightad.model_file import read_metadata

    assert read_metadata(out)["params"]["layers"] == ["blocks.2", "blocks.4"]
    assert main(["train", "--method", "padim", "--data", str(mvtec_dir), "--image-size", "32", "--layers",
                 "blocks.99", "--out", str(tmp_path / "n.safetensors"), "--no-onnx"]) == 1
    assert "blocks.99" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "padim", "--data", str(mvtec_dir), "--layers", "1.5", "--out",
              str(tmp_path / "o.safetensors")])
    assert "expected a list of int or module names such as blocks.2" in capsys.readouterr().err
