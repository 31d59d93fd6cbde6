"""The insightad command end to end, in-process: train, predict, evaluate, info, demo, config, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from insightad.cli import main
from insightad.model_file import read_metadata
from tests.conftest import SIZE


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_predict_evaluate_on_holdout_layout(crack_dir, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "train", "--mode", "baseline", "--data", crack_dir, "--out", model,
                         "--image_size", SIZE, "--batch_size", 8, "--holdout", 0.25)
    assert code == 0, err
    assert "8 normal images held out" in out and str(model) in out and model.exists()
    meta = json.loads(run(capsys, "info", "--model", model)[1])
    assert meta["split"]["holdout"] == "8 files" and meta["split"]["holdout_fraction"] == 0.25

    code, out, _ = run(capsys, "evaluate", "--model", model, "--data", crack_dir, "--json")
    m = json.loads(out)
    assert code == 0 and m["n_normal"] == 8 and m["n_anomalous"] == 4
    for key in ("image_auroc", "average_precision", "accuracy", "precision", "recall", "f1", "threshold"):
        assert key in m

    img = sorted((crack_dir / "Positive").iterdir())[0]
    code, out, _ = run(capsys, "predict", "--model", model, img, "--json")
    line = json.loads(out.strip().splitlines()[0])
    assert code == 0 and set(line) >= {"path", "score", "threshold", "anomalous"}
    code, out, _ = run(capsys, "predict", "--model", model, "--image", img, "--threshold", 1e9)
    assert code == 0 and "normal" in out and "1e+09" in out


def test_evaluate_leaves_training_images_out(crack_dir, tmp_path, capsys):
    """The training folder itself: its training images are left out (one warning line naming the first and how
    many), the held-out normals in it are evaluated; only training images is an error."""
    model = tmp_path / "m.safetensors"
    assert run(capsys, "train", "--data", crack_dir, "--out", model, "--image-size", SIZE)[0] == 0
    code, out, err = run(capsys, "evaluate", "--model", model, "--data", crack_dir / "Negative", "--json")
    assert code == 0 and err.count("\n") == 1 and "this image (and 23 more) was used to train the model" in err
    assert "left out of the evaluation" in err and json.loads(out)["n_normal"] == 6  # the held-out normals
    only = tmp_path / "only"
    only.mkdir()
    train = read_metadata(model)["split"]["train"]
    for name in train[:3]:
        shutil.copy(crack_dir / name, only / Path(name).name)
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", only)
    assert code == 1 and "no images left to evaluate: all 3 were used to train the model" in err


def test_table_output_and_mvtec(baseline_model, mvtec_dir, capsys):
    code, out, _ = run(capsys, "evaluate", "--model", baseline_model, "--data", mvtec_dir)
    assert code == 0 and "image_auroc" in out and "8 normal, 16 anomalous" in out


def test_config_file_and_flag_override(folder_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'method = "baseline"\nimage-size = {SIZE}\nk = 2\n[train]\nholdout = 0.5\n')
    model = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "train", "--config", cfg, "--data", folder_dir, "--out", model, "--k", 4)
    assert code == 0, err
    meta = json.loads(run(capsys, "info", "--model", model)[1])
    assert meta["params"]["k"] == 4 and meta["params"]["image_size"] == SIZE
    assert meta["split"]["holdout_fraction"] == 0.5
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nnot_an_option = 1\n")
    code, _, err = run(capsys, "train", "--config", bad, "--data", folder_dir, "--out", model)
    assert code == 1 and "unknown key 'not_an_option'" in err
    bad.write_text("this is = = not toml")
    code, _, err = run(capsys, "train", "--config", bad, "--data", folder_dir)
    assert code == 1 and "not valid TOML" in err


def test_config_file_list_settings(folder_dir, tmp_path, capsys):
    """A list setting in a config file: a TOML list, or a string written as on the command line; anything else
    is one line naming the setting (a bare number was a TypeError traceback)."""
    cfg = tmp_path / "c.toml"
    model = tmp_path / "m.safetensors"
    for written in ('"2,3"', "[2, 3]"):
        cfg.write_text(f'method = "baseline"\nimage-size = {SIZE}\nlayers = {written}\n')
        code, _, err = run(capsys, "train", "--config", cfg, "--data", folder_dir, "--out", model)
        assert code == 0, err
        assert json.loads(run(capsys, "info", "--model", model)[1])["params"]["layers"] == [2, 3]
    for written in ("5", "[2.5]", "[true]"):
        cfg.write_text(f'method = "baseline"\nlayers = {written}\n')
        model.unlink(missing_ok=True)
        code, _, err = run(capsys, "train", "--config", cfg, "--data", folder_dir, "--out", model)
        assert code == 1 and "layers: expected a list of int (e.g. 1,2,3)" in err and err.count("\n") == 1, err
        assert not model.exists()
    cfg.write_text('method = "svdd"\nstandardize = "no"\n')  # was taken as true
    code, _, err = run(capsys, "train", "--config", cfg, "--data", folder_dir, "--out", model)
    assert code == 1 and "key 'standardize': expected a TOML boolean (true or false), got \"no\"" in err and not model.exists()


@pytest.mark.parametrize("argv,msg", [
    (["train", "--data", "/nonexistent/x"], "no such file or folder"),
    (["predict", "--model", "/nonexistent/m.safetensors", "/nonexistent/a.png"], "no such file"),
    (["evaluate", "--model", "/nonexistent/m.safetensors", "--data", "/nonexistent"], "model file not found"),
    (["train", "--data", ".", "--batch-size", "0"], "batch_size: expected a value >= 1"),
])
def test_errors_are_one_line_with_nonzero_exit(argv, msg, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 1 and msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_threshold_files(baseline_model, mvtec_dir, tmp_path, capsys):
    pkl = tmp_path / "thr.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    img = sorted((mvtec_dir / "test" / "good").iterdir())[0]
    code, _, err = run(capsys, "predict", "--model", baseline_model, img, "--threshold", pkl)
    assert code == 1 and "pickle" in err
    js = tmp_path / "thr.json"
    js.write_text('{"threshold": 0.25}')
    code, out, _ = run(capsys, "predict", "--model", baseline_model, img, "--threshold", js, "--json")
    assert code == 0 and json.loads(out)["threshold"] == 0.25


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "nope", "--data", "."])
    assert e.value.code == 2
    assert main([]) == 2


def test_help_everywhere(capsys):
    for cmd in ("train", "predict", "evaluate", "demo", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: insightad" in capsys.readouterr().out


def test_demo(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--json")
    assert code == 0, err
    assert "demo finished" in out and (tmp_path / "demo" / "examples" / "examples.png").exists()
    metrics = json.loads([line for line in out.splitlines() if line.startswith("{")][0])
    assert metrics["image_auroc"] > 0.9


def test_command_line_keeps_the_kernel_compiler_out(tmp_path):
    """A training command's process never loads Triton (75 MB and a slower start for kernels it never compiles)."""
    import subprocess
    import sys

    code = ("import sys\nfrom insightad.cli import main\ntry:\n    main(['train', '--method', 'padim', '--help'])\n"
            "except SystemExit:\n    pass\nimport torch, torchvision\n"
            "assert 'torch' in sys.modules and sys.modules.get('triton') is None, 'triton loaded'\nprint('checked')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("checked\n"), done.stderr[-2000:]


def test_command_line_defers_the_graph_compiler(tmp_path):
    """timm and torchvision import without torch._dynamo (150 MB and over a second at each start); the names
    they took from it still work, and the real torch._dynamo imports afterwards (no stand-in left behind)."""
    import subprocess
    import sys

    code = """
import sys
from insightad.lazy_imports import without_kernel_compiler
without_kernel_compiler()
import torch, timm, torchvision.transforms.v2
from torchvision.transforms.v2 import functional as TF
assert 'torch._dynamo' not in sys.modules and 'sympy' not in sys.modules, 'compiler imported'
assert '_dynamo' not in torch.__dict__, 'stand-in left on torch'
out = TF.horizontal_flip(torch.arange(6.0).reshape(1, 2, 3))  # a torchvision call through its wrappers
assert out[0, 0, 0] == 2.0
from torchvision.tv_tensors import Image, wrap
assert isinstance(wrap(torch.zeros(1, 2, 2), like=Image(torch.ones(1, 2, 2))), Image)  # decorated by disable
from torchvision.ops import roi_align
assert roi_align.__globals__['is_compile_supported']('cpu') in (True, False)
import torch._dynamo
assert hasattr(torch._dynamo, 'optimize') and not getattr(torch._dynamo, '_insightad_stand_in', False)
assert callable(torch.compiler.disable(lambda: 1))
print('checked')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.endswith("checked\n"), done.stderr[-2000:]


def test_deferred_graph_compiler_gives_the_real_one_for_anything_else():
    """While the stand-in is in place, any other name or submodule of torch._dynamo is the real one (a newer timm or
    torchvision that asks for more at import gets it, at the usual cost), and no stand-in is left behind."""
    import subprocess
    import sys

    start = """
import sys
from insightad.lazy_imports import _DeferCompiler, without_kernel_compiler
without_kernel_compiler()
import torch
finder = next(f for f in sys.meta_path if isinstance(f, _DeferCompiler))
"""
    another_name = """
with finder.standing_in():
    import torch._dynamo as stand_in
    assert getattr(stand_in, '_insightad_stand_in', False)
    assert callable(stand_in.is_compiling)  # another name: the real module's
with finder.standing_in():
    pass  # the real module is in place now: nothing stands in
"""
    a_submodule = """
with finder.standing_in():
    import torch._dynamo.config as config  # a submodule: the real package first
    assert hasattr(config, 'cache_size_limit')
"""
    end = """
assert not getattr(sys.modules['torch._dynamo'], '_insightad_stand_in', False)
print('checked')
"""
    for middle in (another_name, a_submodule):
        done = subprocess.run([sys.executable, "-c", start + middle + end], capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0 and done.stdout.endswith("checked\n"), done.stderr[-2000:]
