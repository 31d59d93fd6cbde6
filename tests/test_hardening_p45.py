"""Sweep of a model's life after training: calibrate, export, info, predict and evaluate on model files and ONNX
exports, threshold files, the graph beside a model, and the runtime-only install (no PyTorch).

Each test failed before its fix and passes after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from insightad.cli import main

HOOK = Path(__file__).parent / "no_torch_site"  # on PYTHONPATH: PyTorch cannot be imported (tests/test_runtime_only.py)


@pytest.fixture(scope="module")
def baseline_onnx(baseline_model, tmp_path_factory) -> Path:
    """The conftest baseline exported once: an InsightAD ONNX export."""
    out = tmp_path_factory.mktemp("p45-export") / "baseline.onnx"
    assert main(["export", "--model", str(baseline_model), "--out", str(out)]) == 0
    return out


def _edited_export(source: Path, target: Path, **changes) -> Path:
    """A copy of the export ``source`` whose ``insightad`` metadata entry has ``changes`` (None: key removed), as
    written by hand or by an exporter before content checksums (its checksum entry is left out: with it, the
    edit is refused as damage before any field is read; tests/test_hardening_p47.py)."""
    import onnx

    from insightad.engines.checksum import CONTENT_KEY

    model = onnx.load(str(source))
    entry = next(p for p in model.metadata_props if p.key == "insightad")
    meta = json.loads(entry.value)
    for key, value in changes.items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    entry.value = json.dumps(meta)
    kept = [p for p in model.metadata_props if p.key != CONTENT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize("value, expected", [("-1e-3", "(threshold -0.001)"), ("-5.", "(threshold -5)"),
                                             ("-.5E1", "(threshold -5)")])
def test_p45_negative_numbers_in_any_spelling_are_values(value, expected, baseline_model, mvtec_dir, capsys):
    """argparse reads only -5 and -0.5 as numbers: ``--threshold -1e-3`` stopped with 'expected one argument'."""
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--threshold", value, str(image)]) == 0
    out = capsys.readouterr().out
    assert expected in out and "ANOMALOUS" in out


@pytest.mark.parametrize("value", ["-inf", "-NaN", "-Infinity"])
def test_p45_negative_infinity_is_refused_as_not_finite(value, baseline_model, mvtec_dir, capsys):
    """``--threshold -inf`` was 'expected one argument' (as if no value were given), not the finite-number rule."""
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--model", str(baseline_model), "--threshold", value, str(image)]) == 1
    assert f"--threshold: expected a finite number, got {value!r}" in capsys.readouterr().err


def _no_torch(*argv: str) -> subprocess.CompletedProcess:
    """``python -m insightad ARGV`` as on a runtime-only install (PyTorch, timm, torchvision refused at import)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOK), str(Path(__file__).parents[1] / "src")])}
    return subprocess.run([sys.executable, "-m", "insightad", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


def test_p45_info_without_torch_reads_backbone_files_and_refuses_others_in_one_line(baseline_model, tmp_path):
    """On the runtime install, ``info`` on any file that is not a model file (a backbone file, a damaged model
    file, another tool's safetensors) fell back to the backbone reader, whose package imports PyTorch: a
    traceback ending in 'No module named torch'."""
    from safetensors.numpy import save_file

    backbone = tmp_path / "bb.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(backbone),
              metadata={"insightad_backbone": json.dumps({"arch": "tf_efficientnet_lite0", "pretext": "cutpaste"})})
    got = _no_torch("info", "--model", str(backbone))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"file": "backbone", "arch": "tf_efficientnet_lite0", "pretext": "cutpaste"}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(baseline_model.read_bytes()[:5000])
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other))
    for path in (cut, other):
        got = _no_torch("info", "--model", str(path))
        assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
        assert got.stderr.startswith(f"insightad: error: {path}: ") and len(got.stderr.splitlines()) == 1


@pytest.mark.parametrize("changes, field", [({"input_height": None}, "'input_height': missing"),
                                            ({"method": None}, "'method': missing"),
                                            ({"threshold": "abc"}, "'threshold': Input should be a valid number"),
                                            ({"tiles": "x"}, "'tiles': Input should be a valid integer"),
                                            ({"threshold_details": "zz"}, "'threshold_details': Input should be"),
                                            ({"has_maps": "yes"}, "'has_maps': Input should be a valid boolean")])
def test_p45_edited_onnx_metadata_is_one_line_naming_the_field(changes, field, baseline_onnx, mvtec_dir, tmp_path,
                                                                capsys):
    """An export whose metadata lacked a key or held the wrong type scored with a traceback (KeyError, TypeError,
    ValueError), or, for ``method``, printed its table and then failed; info printed it as if it were fine."""
    edited = _edited_export(baseline_onnx, tmp_path / "edited.onnx", **changes)
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    for argv in (["predict", "--model", str(edited), "--json", str(image)], ["info", "--model", str(edited)]):
        assert main(argv) == 1
        got = capsys.readouterr()
        assert got.out == "" and got.err.startswith(f"insightad: error: {edited}: ONNX export metadata field {field}")
        assert len(got.err.splitlines()) == 1


def test_p45_export_never_takes_the_graph_of_another_model_file(baseline_model, tmp_path, capsys):
    """``export --model b --out a.onnx`` replaced a.onnx, the graph beside a.safetensors that predict, serve and the
    runtime install score a.safetensors with, by b's graph, without a word (predict on a then warned it was stale,
    and a runtime-only install could no longer score a at all)."""
    import shutil

    from insightad.model_file import update_metadata

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(baseline_model, a)
    shutil.copy(baseline_model, b)
    update_metadata(b, created="another model")  # other content, another sha256
    assert main(["export", "--model", str(a)]) == 0
    graph = (tmp_path / "a.onnx").read_bytes()
    capsys.readouterr()
    assert main(["export", "--model", str(b), "--out", str(tmp_path / "a.onnx")]) == 1
    assert capsys.readouterr().err == (f"insightad: error: --out {tmp_path / 'a.onnx'}: the ONNX graph beside another "
                                       f"model file ({a}), which scores that model; writing this model's graph there "
                                       "would replace it: choose another name\n")
    assert (tmp_path / "a.onnx").read_bytes() == graph
    shutil.copy(baseline_model, tmp_path / "a.copy")  # a copy of a: the graph stays right for both
    assert main(["export", "--model", str(a)]) == 0
    assert main(["export", "--model", str(tmp_path / "a.copy"), "--out", str(tmp_path / "a.onnx")]) == 0


def test_p45_a_model_file_named_onnx_is_read_as_the_model_file_it_is(baseline_model, mvtec_dir, tmp_path, capsys):
    """A model file renamed .onnx was 'not a readable ONNX file (Protobuf parsing failed)' for predict and info,
    and export said it was 'already an ONNX graph ... used as it is', which it is not: the kind of a file is its
    content, the name only tells a graph from a model file when the content is not a safetensors file."""
    import shutil

    renamed = tmp_path / "model.onnx"
    shutil.copy(baseline_model, renamed)
    image = str(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0])
    assert main(["predict", "--model", str(baseline_model), "--json", image]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["predict", "--model", str(renamed), "--json", image]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == expected["score"]
    assert main(["info", "--model", str(renamed)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "insightad-model"
    assert main(["export", "--model", str(renamed), "--out", str(tmp_path / "graph.onnx")]) == 0
    assert "exported baseline" in capsys.readouterr().out


def test_p45_an_onnx_graph_named_as_a_model_file_says_so(baseline_onnx, mvtec_dir, tmp_path, capsys):
    """An export renamed .safetensors was 'not a valid InsightAD model file (... header too large)'."""
    import shutil

    renamed = tmp_path / "model.safetensors"
    shutil.copy(baseline_onnx, renamed)
    image = str(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0])
    for argv in (["predict", "--model", str(renamed), image], ["info", "--model", str(renamed)],
                 ["export", "--model", str(renamed), "--out", str(tmp_path / "g.onnx")]):
        assert main(argv) == 1
        assert capsys.readouterr().err == (f"insightad: error: {renamed}: an ONNX graph, not a model file "
                                           "(safetensors); InsightAD reads a graph from a .onnx name: rename it\n")


def test_p45_a_threshold_file_of_the_same_model_before_a_rewrite_says_so(baseline_model, mvtec_dir, tmp_path,
                                                                         capsys):
    """After ``calibrate`` (or train) rewrote m.safetensors, its older threshold file was refused as 'chosen for
    another model (/.../m.safetensors ...), not for m.safetensors': the same name, called another model."""
    import shutil

    from insightad.io import file_sha256
    from insightad.model_file import update_metadata

    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"threshold": 1.5, "model": str(model), "model_sha256": file_sha256(model)}))
    update_metadata(model, created="calibrated again")
    image = str(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0])
    assert main(["predict", "--model", str(model), "--threshold", str(thr), image]) == 1
    err = capsys.readouterr().err
    assert f"{thr}: this threshold was chosen for {model} as it was before it was rewritten" in err
    assert "another model" not in err


def test_p45_info_json_and_unknown_flags_name_the_command(baseline_model, capsys):
    """``info --json`` (the flag every other reading command takes) stopped with the top parser's usage
    ('usage: insightad [-h] [--version] COMMAND ...'), as did any unknown flag of any command: a usage that names
    none of the command's flags."""
    assert main(["info", "--model", str(baseline_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "baseline"
    with pytest.raises(SystemExit) as stop:
        main(["info", "--model", str(baseline_model), "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: insightad info ") and "insightad info: error: unrecognized arguments: --bogus" in err


def test_p45_evaluate_on_an_export_keeps_to_the_held_out_split(folder_dir, tmp_path, capsys):
    """``evaluate --model model.onnx`` on the training dataset scored every normal image, the training images
    included, without a word (export carried no split): optimistic figures. The export carries the split now;
    an export made before it did says so."""
    from insightad.apps.train import train_model
    from insightad.config import DataParams

    model = tmp_path / "m.safetensors"
    train_model(folder_dir, "baseline", {"image_size": 32}, DataParams(), model, progress=False)
    graph = tmp_path / "m-export.onnx"
    assert main(["export", "--model", str(model), "--out", str(graph)]) == 0
    counts = []
    for path in (model, graph):
        capsys.readouterr()
        assert main(["evaluate", "--model", str(path), "--data", str(folder_dir), "--json", "--no-progress"]) == 0
        got = json.loads(capsys.readouterr().out)
        counts.append((got["n_normal"], got["n_anomalous"]))
    assert counts[0] == counts[1] == (6, 12)  # the held-out normals, not the 30 normals of the folder
    old = _edited_export(graph, tmp_path / "old.onnx", split=None)
    assert main(["evaluate", "--model", str(old), "--data", str(folder_dir), "--json", "--no-progress"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["n_normal"] == 30
    assert f"{old}: this export records no training split" in got.err


def test_p45_tile_and_search_on_an_export_or_without_torch_are_one_true_line(baseline_onnx, baseline_model,
                                                                             mvtec_dir, capsys):
    """``predict --model x.onnx --tile 2`` said 'drop --engine torch', a flag never given; on the runtime install
    ``--tile``/``--search`` with a model file ended in a traceback (No module named 'torch')."""
    image = str(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0])
    for flag in (["--tile", "2"], ["--search", "exact"]):
        assert main(["predict", "--model", str(baseline_onnx), *flag, image]) == 1
        err = capsys.readouterr().err
        assert f"{baseline_onnx}: --tile/--overlap/--search change the model's graph, and an ONNX export is a fixed " \
               "graph" in err and "--engine torch" not in err
    got = _no_torch("evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--tile", "2")
    assert got.returncode == 1 and "Traceback" not in got.stderr
    assert got.stderr == ("insightad: error: --tile/--overlap/--search change the model's graph, which needs "
                          "PyTorch; this install does not have it: pip install 'insightad[train]'\n")


def test_p45_calibrate_out_replaces_only_a_threshold_file(baseline_model, mvtec_dir, tmp_path, capsys):
    """``calibrate --dry-run --out t.json`` with t.json a link to the model file wrote JSON over the model (and
    printed 'the model file was not changed'); a link to an image of --data turned the image into JSON."""
    import shutil

    model = tmp_path / "m.safetensors"
    shutil.copy(baseline_model, model)
    image = tmp_path / "part.png"
    shutil.copy(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0], image)
    kept = {model: model.read_bytes(), image: image.read_bytes()}
    for target in (model, image):
        link = tmp_path / f"{target.stem}-link.json"
        link.symlink_to(target)
        assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--dry-run", "--out",
                     str(link)]) == 1
        expected = "an input of this run" if target == model else f"links to {target}, which is not a threshold file"
        assert expected in capsys.readouterr().err
    notes = tmp_path / "notes.json"
    notes.write_text("my notes, not JSON")
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--dry-run", "--out", str(notes)]) == 1
    assert f"{notes}: --out exists and is not a threshold file" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in kept} == kept and notes.read_text() == "my notes, not JSON"
    thr = tmp_path / "thr.json"
    thr.write_text('{"threshold": 1.0}')
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--dry-run", "--out", str(thr)]) == 0
    assert json.loads(thr.read_text())["threshold"] != 1.0


def test_p45_export_out_replaces_only_an_onnx_graph(baseline_model, mvtec_dir, tmp_path, capsys):
    """``export --out x.onnx`` with x.onnx a link to an image wrote the graph over the image; a file of notes named
    .onnx was replaced the same way. A graph (even a damaged one) is still replaced."""
    import shutil

    image = tmp_path / "part.png"
    shutil.copy(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0], image)
    link, notes = tmp_path / "link.onnx", tmp_path / "notes.onnx"
    link.symlink_to(image)
    notes.write_text("my notes")
    kept = image.read_bytes()
    assert main(["export", "--model", str(baseline_model), "--out", str(link)]) == 1
    assert f"--out {link}: links to {image}, which is not an ONNX graph" in capsys.readouterr().err
    assert main(["export", "--model", str(baseline_model), "--out", str(notes)]) == 1
    assert f"--out {notes}: exists and is not an ONNX graph" in capsys.readouterr().err
    assert image.read_bytes() == kept and notes.read_text() == "my notes"
    damaged = tmp_path / "damaged.onnx"
    assert main(["export", "--model", str(baseline_model), "--out", str(damaged)]) == 0
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert main(["export", "--model", str(baseline_model), "--out", str(damaged)]) == 0


@pytest.mark.parametrize("command", ["export", "calibrate"])
def test_p45_a_missing_or_folder_onnx_name_is_not_called_a_graph(command, mvtec_dir, tmp_path, capsys):
    """``export --model missing.onnx`` said 'already an ONNX graph', calibrate 'not an ONNX export', for a name
    that does not exist or is a folder."""
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    for path, message in ((tmp_path / "missing.onnx", "model file not found"),
                          (folder, "is a folder, expected a model file")):
        argv = [command, "--model", str(path)] + (["--data", str(mvtec_dir)] if command == "calibrate" else [])
        assert main(argv) == 1
        assert capsys.readouterr().err == f"insightad: error: {path}: {message}\n"


def test_p45_info_names_the_graph_revision_an_older_export_has(baseline_onnx, tmp_path, capsys):
    """An export made before graphs carried a revision (revision 1: its scores can differ) was shown by info with
    no revision at all: info now shows the stamps as the code reads them."""
    import onnx

    from insightad.engines.checksum import CONTENT_KEY

    model = onnx.load(str(baseline_onnx))
    kept = [p for p in model.metadata_props if p.key not in ("insightad_graph_revision", CONTENT_KEY)]  # as before both
    for p in kept:
        if p.key == "insightad":
            meta = json.loads(p.value)
            meta.pop("insightad_graph_revision")
            p.value = json.dumps(meta)
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    assert main(["info", "--model", str(old)]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["insightad_graph_revision"] == "1" and "graph revision 1" in got.err
