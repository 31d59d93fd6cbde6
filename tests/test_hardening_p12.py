"""Issue 12 point 12: sizes bounded in the parameters and in model-file metadata, refused before allocating."""

from __future__ import annotations

import json

import pytest

from insightad.cli import main
from insightad.errors import InsightADError
from insightad.model_file import META_KEY


def _variant(model, path, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    change(meta)
    save_file(load_file(str(model)), str(path), metadata={META_KEY: json.dumps(meta)})


def test_p12_train_image_size_too_large(folder_dir, tmp_path, capsys):
    code = main(["train", "--data", str(folder_dir), "--out", str(tmp_path / "m.safetensors"),
                 "--image-size", "100000"])
    err = capsys.readouterr().err
    assert code == 1 and "image_size" in err and "4096" in err and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("method", ["autoencoder", "ssl", "padim"])
def test_p12_image_size_bounded_for_every_method(method):
    from insightad import config
    from insightad.apps.train import params_class

    with pytest.raises(InsightADError, match="image_size"):
        config.build(params_class(method), {"image_size": 60000})


def test_p12_model_file_preprocessing_size_too_large(baseline_model, mvtec_dir, tmp_path, capsys):
    path = tmp_path / "big.safetensors"
    _variant(baseline_model, path, lambda m: m["preprocessing"].update(size=[60000, 60000]))
    image = next((mvtec_dir / "test" / "good").iterdir())
    code = main(["predict", "--model", str(path), "--engine", "torch", str(image)])
    err = capsys.readouterr().err
    assert code == 1 and str(path) in err and "preprocessing.size" in err


def test_p12_giant_backbone_refused_before_allocating(baseline_model, mvtec_dir, tmp_path, capsys):
    from insightad.backbones.extractor import build_extractor

    with pytest.raises(InsightADError, match="M parameters"):
        build_extractor("vit_giant_patch14_224", [1], pretrained=False)
    path = tmp_path / "giant.safetensors"
    _variant(baseline_model, path, lambda m: m["backbone"].update(arch="vit_giant_patch14_224"))
    image = next((mvtec_dir / "test" / "good").iterdir())
    code = main(["predict", "--model", str(path), "--engine", "torch", str(image)])
    err = capsys.readouterr().err
    assert code == 1 and str(path) in err and "vit_giant_patch14_224" in err and "M parameters" in err
