"""Issue 12 point 29: --help shows every default; one --device default everywhere; the decision is called
``anomalous`` (a boolean) in every machine-readable output."""

from __future__ import annotations

import csv
import shutil

import pytest

from insightad import config
from insightad.cli import main


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


def test_p29_predict_help_shows_engine_and_device_defaults(capsys):
    text = _help(capsys, "predict")
    engine = text[text.rindex("--engine {"):text.rindex("--threads N")]
    device = text[text.rindex("--device DEVICE"):]
    assert "(default: auto)" in engine and "(default: auto)" in device


def _entries(capsys, *argv) -> dict[str, str]:
    """Option -> its whole help entry (first flag spelling as key), from the raw --help text."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    entries: dict[str, str] = {}
    key = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif key and line.startswith("    "):
            entries[key] += " " + line.strip()
        else:
            key = None
    return entries


@pytest.mark.parametrize("command,flags", [("demo", ["--out", "--kind", "--seed", "--method"]),
                                           ("export", ["--format", "--out"])])
def test_p29_demo_and_export_help_show_defaults(capsys, command, flags):
    entries = _entries(capsys, command)
    for flag in flags:
        assert "(default:" in entries[flag], entries[flag]


def test_p29_augment_input_out_have_help(capsys):
    text = _help(capsys, "augment")
    assert "folder of normal images to augment" in text and "folder to write the augmented images" in text


def test_p29_layers_default_written_as_typed(capsys):
    text = _help(capsys, "train", "--method", "baseline")
    assert "(default: 1,2,3)" in text and "[1, 2, 3]" not in text


def test_p29_device_default_is_the_same_everywhere():
    import argparse

    from insightad.cli.common import add_engine_flags

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    from insightad.apps.serve.settings import ServeParams

    defaults = {ServeParams().device, config.TrainLoopParams().device, config.DetectorParams().device,
                p.get_default("device")}
    assert defaults == {"auto"}


def test_p29_sort_csv_has_anomalous_boolean(baseline_model, mvtec_dir, tmp_path):
    from insightad.apps.sort import FolderSorter
    from insightad.inference.load import load_for_inference

    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((mvtec_dir / "test").rglob("*.png"))[:4]:
        shutil.copyfile(p, src / f"{p.parent.name}_{p.name}")
    (src / "broken.png").write_bytes(b"no")
    det = load_for_inference(baseline_model, "torch")
    FolderSorter(det, src, tmp_path / "out", progress=False).run()
    with open(tmp_path / "out" / "results.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    for r in rows:
        expected = {"anomalous": "true", "normal": "false", "error": ""}[r["decision"]]
        assert r["anomalous"] == expected


def test_p29_prediction_has_anomalous(baseline_model, mvtec_dir):
    from insightad.model_file import load_model

    pred = load_model(baseline_model).predict(sorted((mvtec_dir / "test" / "good").iterdir())[:2], maps=False)
    assert pred.anomalous.dtype == bool and list(pred.anomalous) == list(pred.labels)


@pytest.mark.parametrize("method", ["baseline", "padim", "patchcore", "svdd", "autoencoder", "ssl", "auto"])
def test_p29_train_help_renders_for_every_method(capsys, method):
    """A setting's help text with a percent sign (PatchCore's score_top: '5%') once crashed argparse's help."""
    text = _help(capsys, "train", "--method", method)
    assert "(default:" in text
    if method == "patchcore":
        assert "5% chosen" in text
