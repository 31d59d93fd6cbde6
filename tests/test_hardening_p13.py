"""Issue 12 point 13: hostile model-file metadata gets one line naming the file and the field, never a traceback."""

from __future__ import annotations

import json

import pytest

from insightad.cli import main
from insightad.model_file import META_KEY


def _tensors_and_meta(model):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    return load_file(str(model)), meta


def write_variant(path, tensors, raw_meta: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={META_KEY: raw_meta})


def _set(path: str, value):
    def change(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
        return meta
    return change


def _drop(key: str):
    def change(meta):
        meta.pop(key)
        return meta
    return change


# (name, change to the metadata dict or a function giving the raw JSON, field the message must name)
VARIANTS = [
    ("top_level_list", lambda m: [m], "metadata"),
    ("top_level_string", lambda m: "model", "metadata"),
    ("method_list", _set("method", ["baseline"]), "method"),
    ("method_missing", _drop("method"), "method"),
    ("method_unknown", _set("method", "nope"), "method"),
    ("method_20mb", _set("method", "x" * 20_000_000), "method"),
    ("format_version_null", _set("format_version", None), "format_version"),
    ("format_version_abc", _set("format_version", "abc"), "format_version"),
    ("params_string", _set("params", "k=3"), "params"),
    ("params_unknown_key", _set("params.nope", 1), "params"),
    ("params_image_size_huge", _set("params.image_size", 100_000), "params"),
    ("preprocessing_missing", _drop("preprocessing"), "preprocessing"),
    ("preprocessing_size_huge", _set("preprocessing.size", [60000, 60000]), "preprocessing.size"),
    ("preprocessing_std_zero", _set("preprocessing.std", [0.0, 0.0, 0.0]), "preprocessing.std"),
    ("preprocessing_channels", _set("preprocessing.channels", 7), "preprocessing.channels"),
    ("threshold_missing", _drop("threshold"), "threshold"),
    ("threshold_value_string", _set("threshold.value", "0.5"), "threshold.value"),
    ("threshold_value_null", _set("threshold.value", None), "threshold.value"),
    ("threshold_details_list", _set("threshold.details", [1, 2]), "threshold.details"),
    ("threshold_scale_string", _set("threshold.details.scale", "wide"), "threshold.details.scale"),
    ("backbone_string", _set("backbone", "resnet18"), "backbone"),
    ("split_string", _set("split", "train"), "split"),
    ("split_list", _set("split", ["a.png"]), "split"),
    ("training_string", _set("training", "yes"), "training"),
    ("state_list", _set("state", [1]), "state"),
    ("deep_nesting", "deep", "nested"),
]


@pytest.fixture(scope="module")
def source(baseline_model):
    return _tensors_and_meta(baseline_model)


@pytest.mark.parametrize("name,change,field", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("command", ["info", "predict"])
def test_p13_hostile_metadata(name, change, field, command, source, mvtec_dir, tmp_path, capsys):
    tensors, meta = source
    path = tmp_path / f"{name}.safetensors"
    if change == "deep":
        raw = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        raw = json.dumps(change(json.loads(json.dumps(meta))))
    write_variant(path, tensors, raw)
    image = next((mvtec_dir / "test" / "good").iterdir())
    argv = ["info", "--model", str(path)] if command == "info" else [
        "predict", "--model", str(path), "--engine", "torch", str(image)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("insightad: error: ") and "Traceback" not in err
    assert str(path) in err and field in err
    assert len(err) < 3000  # a 20 MB value is never printed whole


def test_p13_bank_of_the_wrong_shape(source, mvtec_dir, tmp_path, capsys):
    tensors, meta = source
    bad = dict(tensors)
    bad["bank"] = tensors["bank"][:, :10].contiguous()
    path = tmp_path / "bank.safetensors"
    write_variant(path, bad, json.dumps(meta))
    image = next((mvtec_dir / "test" / "good").iterdir())
    for engine in ("torch", "onnx"):
        code = main(["predict", "--model", str(path), "--engine", engine, str(image)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err


def test_p13_good_file_still_reads(baseline_model, capsys):
    assert main(["info", "--model", str(baseline_model)]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "baseline"
