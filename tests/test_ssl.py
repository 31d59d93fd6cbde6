"""SSL backbones: CutPaste (the default) and rotation prediction, which learns on oriented objects and warns near
chance; the file is a backbone for every method."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from insightad.cli import main
from insightad.errors import InsightADError

ARROW = 48  # working size of the SSL tests: an arrow is still clearly oriented at 48 px
TINY_FLAGS = ["--backbone", "test_efficientnet", "--init", "random", "--image-size", str(ARROW), "--epochs", "3",
              "--batch-size", "8", "--lr", "3e-3", "--val-fraction", "0.25", "--no-progress"]
SSL_FLAGS = ["--pretext", "rotation", *TINY_FLAGS]  # the rotation tests: arrows have a clear up direction


@pytest.fixture(scope="session")
def arrow_dir(tmp_path_factory):
    """Arrows (a clear up direction) in MVTec layout: 32 good training images, a few defective ones."""
    from insightad.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("arrow") / "arrow", kind="arrow", layout="mvtec", n_train=32,
                         n_test_good=6, n_per_defect=3, defects=("missing", "blob"), size=ARROW, seed=5)


@pytest.fixture(scope="session")
def ssl_run(arrow_dir, tmp_path_factory):
    """`insightad train --method ssl` on the arrows: (backbone path, stdout, stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ssl") / "arrow-ssl.safetensors"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", "--method", "ssl", "--data", str(arrow_dir), "--out", str(out), *SSL_FLAGS])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def test_ssl_learns_rotation_and_writes_a_backbone_file(ssl_run):
    from insightad.backbones.registry import get_spec, read_backbone_file_meta

    path, stdout, stderr = ssl_run
    meta = read_backbone_file_meta(path)
    acc = meta["rotation_accuracy"]
    assert acc["heldout"] and acc["n_images"] == 8
    assert acc["value"] >= 0.6, meta["training"]  # chance is 0.25
    assert "warning" not in stderr and meta["warning"] is None
    assert meta["arch"] == "test_efficientnet" and meta["input_size"] == ARROW and meta["init"] == "random"
    assert len(meta["split"]["train"]) == 32
    spec = get_spec(f"ssl:{path}")
    assert spec.arch == "test_efficientnet" and tuple(spec.mean) == tuple(meta["mean"])
    assert f"--backbone ssl:{path}" in stdout and "rotation accuracy" in stdout
    curves = path.with_suffix(".training")
    for name in ("loss.png", "accuracy.png", "checkpoint.safetensors", "history.json"):
        assert (curves / name).is_file(), name
    history = json.loads((curves / "history.json").read_text())["history"]
    assert len(history) == 3 and "val_accuracy" in history[0]


@pytest.mark.parametrize("method", ["baseline", "svdd"])
def test_ssl_backbone_serves_other_methods(method, ssl_run, arrow_dir, tmp_path):
    from insightad.apps.train import train_model
    from insightad.config import DataParams
    from insightad.model_file import load_model

    path, _, _ = ssl_run
    params = {"backbone": f"ssl:{path}", "image_size": ARROW}
    if method == "svdd":
        params.update(epochs=5, layers=[2, 3, 4])
    det, model_path, _ = train_model(arrow_dir, method, params, DataParams(), tmp_path / "m.safetensors",
                                     progress=False)
    assert det.backbone_source_ == f"ssl:{path.resolve()}"
    images = sorted((arrow_dir / "test").rglob("*.png"))
    before = det.predict(images).scores
    # the model file carries the weights: it still scores with the backbone file gone
    moved = path.with_name("moved.safetensors")
    path.rename(moved)
    try:
        again = load_model(model_path).predict(images).scores
    finally:
        moved.rename(path)
    np.testing.assert_allclose(again, before, rtol=1e-5, atol=1e-6)


def test_ssl_warns_when_rotation_is_unlearnable(tmp_path):
    from insightad.backbones.ssl import RotationUnlearnableWarning, SSLTrainer

    flat = [np.full((32, 32, 3), 90 + 10 * i, np.uint8) for i in range(8)]  # identical at every rotation
    ssl = SSLTrainer(pretext="rotation", backbone="test_efficientnet", init="random", image_size=32, epochs=1,
                     batch_size=4, val_fraction=0.25, lr=1e-3)
    with pytest.warns(RotationUnlearnableWarning, match=r"rotation accuracy stayed near chance \(0\.25"):
        ssl.fit(flat)
    path = ssl.save(tmp_path / "flat.safetensors")
    from insightad.backbones.registry import read_backbone_file_meta

    assert "near chance" in read_backbone_file_meta(path)["warning"]


def test_ssl_cli_prints_the_warning(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"  # the output beside it: its checkpoint's curves.png inside would become data
    data.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (80 + 20 * i,) * 3).save(data / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI reports it as a line, never as a Python warning
        rc = main(["train", "--method", "ssl", "--data", str(data), "--out", str(tmp_path / "b.safetensors"),
                   "--pretext", "rotation", "--backbone", "test_efficientnet", "--init", "random", "--image-size",
                   "32", "--epochs", "1", "--val-fraction", "0.2", "--holdout", "0", "--no-progress"])
    assert rc == 0
    assert "insightad: warning: ssl: rotation accuracy stayed near chance" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "epochs: expected a value >= 1, got -1"),
    (["--batch-size", "0"], "batch_size: expected a value >= 1, got 0"),
    (["--lr", "0"], "lr: expected a value > 0.0, got 0.0"),
    (["--lr", "nan"], "lr: expected a finite number, got nan"),
    (["--init", "random", "--weights", "w.pth"], "weights: only used with --init imagenet"),
    (["--init", "random", "--freeze-levels", "2"], "freeze_levels: only with --init imagenet"),
    (["--freeze-levels", "-1"], "freeze_levels: expected a value >= 0, got -1"),
    (["--init", "random", "--resume"], "no checkpoint to resume from"),
])
def test_ssl_bad_settings_are_clear_errors(flags, message, arrow_dir, tmp_path, capsys):
    rc = main(["train", "--method", "ssl", "--data", str(arrow_dir), "--out", str(tmp_path / "b.safetensors"),
               "--backbone", "test_efficientnet", "--image-size", "32", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "b.safetensors").exists()


def test_bad_init_choice_is_refused(arrow_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "ssl", "--data", str(arrow_dir), "--init", "scratch"])
    assert "invalid choice: 'scratch'" in capsys.readouterr().err


def test_ssl_needs_square_images():
    import torch

    from insightad.backbones.ssl import rotate_batch

    with pytest.raises(InsightADError, match="square"):
        rotate_batch(torch.zeros(1, 3, 8, 6, dtype=torch.uint8))
    x, y = rotate_batch(torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4))
    assert x.shape == (8, 3, 4, 4) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(torch.rot90(x[2:4], 2, (2, 3)), x[6:8])  # 90 twice = 270 once more... both from the same images


def test_cutpaste_generator_is_deterministic_and_changes_a_region():
    import torch

    from insightad.backbones.ssl_cutpaste import cutpaste_batch

    x = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a, la = cutpaste_batch(x, torch.Generator().manual_seed(7))
    b, lb = cutpaste_batch(x, torch.Generator().manual_seed(7))
    c, _ = cutpaste_batch(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert la.tolist() == [0] * 3 + [1] * 3 + [2] * 3 and a.dtype == torch.uint8
    assert torch.equal(a[:3], x)  # class 0: the images as they are
    for k in (1, 2):  # cutpaste and scar: each image changed, in part only
        changed = (a[3 * k:3 * k + 3] != x).any(dim=1).float().mean(dim=(1, 2))
        assert ((changed > 0) & (changed < 0.5)).all(), changed


def test_cutpaste_pretext_trains_and_records_its_accuracy(arrow_dir, tmp_path, capsys):
    from insightad.backbones.registry import read_backbone_file_meta

    out = tmp_path / "cp.safetensors"
    flags = [f if f != "3" else "2" for f in TINY_FLAGS]
    assert main(["train", "--method", "ssl", "--pretext", "cutpaste", "--data", str(arrow_dir), "--out", str(out),
                 *flags]) == 0
    meta = read_backbone_file_meta(out)
    acc = meta["pretext_accuracy"]
    assert meta["pretext"] == "cutpaste" and acc["chance"] == pytest.approx(1 / 3) and 0.0 <= acc["value"] <= 1.0
    assert "rotation_accuracy" not in meta and "cutpaste accuracy" in capsys.readouterr().out


def test_recomputed_activations_train_the_same_backbone(arrow_dir, tmp_path):
    """--recompute-activations (half the memory) trains the same weights and batch-norm statistics."""
    from safetensors.numpy import load_file

    flags = [f if f != "3" else "1" for f in TINY_FLAGS]
    files = []
    for extra in (["--no-recompute-activations"], ["--recompute-activations"]):
        out = tmp_path / f"cp{len(extra)}.safetensors"
        assert main(["train", "--method", "ssl", "--pretext", "cutpaste", "--data", str(arrow_dir), "--out", str(out),
                     *flags, *extra]) == 0
        files.append(load_file(str(out)))
    plain, recomputed = files
    assert plain.keys() == recomputed.keys()
    for k in plain:
        np.testing.assert_allclose(recomputed[k], plain[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def crack_dir(tmp_path_factory):
    """A small crack-layout set (Negative/, Positive/): the model holds normals out by --holdout and --seed."""
    from insightad.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("crackssl") / "crack", kind="weave", layout="crack", n_train=12,
                         n_test_good=4, n_per_defect=2, defects=("crack",), size=32, seed=3)


def _fine_tune(crack_dir, out, holdout, capsys):
    assert main(["train", "--method", "ssl", "--data", str(crack_dir), "--out", str(out), "--holdout", holdout,
                 "--backbone", "test_efficientnet", "--init", "random", "--image-size", "32", "--epochs", "1",
                 "--batch-size", "8", "--val-fraction", "0", "--no-progress"]) == 0
    capsys.readouterr()


def _train_and_evaluate(crack_dir, backbone, model, capsys):
    rc = main(["train", "--method", "baseline", "--data", str(crack_dir), "--backbone", f"ssl:{backbone}",
               "--image-size", "32", "--holdout", "0.25", "--out", str(model), "--no-progress"])
    train_err = capsys.readouterr().err
    assert rc == 0, train_err
    rc = main(["evaluate", "--model", str(model), "--data", str(crack_dir), "--json", "--no-progress"])
    return train_err, rc, capsys.readouterr()


def test_evaluate_leaves_out_images_the_backbone_was_fine_tuned_on(crack_dir, tmp_path, capsys):
    """A backbone fine-tuned on every normal (--holdout 0) has seen the normals the model holds out: train warns,
    evaluate leaves them out in one warning line (their AUROC would be optimistic), and the model file records
    why."""
    from insightad.model_file import read_metadata

    backbone = tmp_path / "all.safetensors"
    _fine_tune(crack_dir, backbone, "0", capsys)
    train_err, rc, out = _train_and_evaluate(crack_dir, backbone, tmp_path / "m.safetensors", capsys)
    assert "insightad: warning: the backbone" in train_err and "fine-tuned on 4 of the 4 images held out" in train_err
    assert rc == 0 and "was used to fine-tune the model's backbone" in out.err and "left out" in out.err
    assert "Traceback" not in out.err and json.loads(out.out)["n_normal"] == 0  # only the cracks are left
    split = read_metadata(tmp_path / "m.safetensors")["split"]
    assert split["backbone"]["file"] == str(backbone.resolve()) and len(split["backbone"]["train"]) == 16


def test_a_backbone_fine_tuned_on_the_models_own_split_evaluates(crack_dir, tmp_path, capsys):
    backbone = tmp_path / "same-split.safetensors"
    _fine_tune(crack_dir, backbone, "0.25", capsys)
    train_err, rc, out = _train_and_evaluate(crack_dir, backbone, tmp_path / "m.safetensors", capsys)
    assert "warning: the backbone" not in train_err
    assert rc == 0, out.err
    assert json.loads(out.out)["n_normal"] == 4


def test_backbone_ssl_fine_tunes_on_the_models_own_training_images_first(crack_dir, tmp_path, capsys):
    """--backbone ssl: one command fine-tunes a CutPaste backbone on exactly the detector's training images
    (written beside the model), then fits the detector on it; nothing held out was seen, so evaluate runs."""
    from insightad.backbones.registry import read_backbone_file_meta
    from insightad.model_file import read_metadata

    model = tmp_path / "m.safetensors"
    rc = main(["train", "--method", "baseline", "--data", str(crack_dir), "--backbone", "ssl", "--image-size", "32",
               "--holdout", "0.25", "--seed", "1", "--weights", "random", "--out", str(model), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    backbone = tmp_path / "m.backbone.safetensors"
    assert "fine-tuning a CutPaste backbone" in err and f"backbone written to {backbone}" in err
    assert "warning: the backbone" not in err
    meta, bb = read_metadata(model), read_backbone_file_meta(backbone)
    assert meta["params"]["backbone"] == f"ssl:{backbone}" and bb["pretext"] == "cutpaste"
    assert bb["input_size"] == 32 and bb["split"]["seed"] == 1 and bb["init"] == "random"  # --weights random: from scratch
    # the detector's backbone is the fine-tuned file, not the starting weights it was asked to start from
    assert meta["params"]["weights"] is None and meta["backbone"]["weights_source"] == f"ssl:{backbone}"
    assert sorted(meta["split"]["backbone"]["train"]) == sorted(meta["split"]["train"]) == sorted(bb["split"]["train"])
    assert main(["evaluate", "--model", str(model), "--data", str(crack_dir), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["n_normal"] == 4


def test_backbone_ssl_alone_is_refused_outside_train():
    from insightad.backbones.registry import get_spec

    with pytest.raises(InsightADError, match="'ssl' alone .* ssl:PATH"):
        get_spec("ssl")


def test_backbone_ssl_checks_its_backbone_file_before_fine_tuning(crack_dir, tmp_path, capsys):
    (tmp_path / "m.backbone.safetensors").mkdir()  # where the backbone would go: a folder, not a file
    rc = main(["train", "--method", "baseline", "--data", str(crack_dir), "--backbone", "ssl", "--image-size", "32",
               "--out", str(tmp_path / "m.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--backbone ssl" in err and "fine-tuning" not in err and err.count("\n") == 1
    assert not (tmp_path / "m.safetensors").exists()


def _from_weights_file(extractor, tmp_path) -> list[str]:
    """TINY_FLAGS (one epoch) starting from ``extractor``'s weights written to a file (levels can only be frozen
    at starting weights that mean something: --init imagenet, here with --weights)."""
    from safetensors.torch import save_file

    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in extractor.body.state_dict().items()}, str(weights))
    flags = [f if f != "3" else "1" for f in TINY_FLAGS if f != "random"]
    flags[flags.index("--init") + 1:flags.index("--init") + 1] = ["imagenet", "--weights", str(weights)]
    return flags


def test_frozen_levels_keep_their_weights_and_statistics(arrow_dir, tmp_path):
    """--freeze-levels N: everything up to the end of level N-1 leaves the run exactly as it started (weights and
    batch-norm statistics); the deeper blocks train."""
    from safetensors.numpy import load_file

    from insightad.backbones import build_extractor
    from insightad.backbones.ssl import modules_through

    start, _, _ = build_extractor("test_efficientnet", [0, 1, 2, 3, 4], None, pretrained=False)
    start_sd = {k: v.numpy().copy() for k, v in start.body.state_dict().items()}
    flags = _from_weights_file(start, tmp_path)
    files = {}
    for n in ("0", "2"):
        out = tmp_path / f"f{n}.safetensors"
        assert main(["train", "--method", "ssl", "--pretext", "cutpaste", "--data", str(arrow_dir), "--out", str(out),
                     "--freeze-levels", n, *flags]) == 0
        files[n] = load_file(str(out))
    names = {id(m): k for k, m in start.body.named_modules()}
    frozen = {names[id(m)] for m in modules_through(start.body, start.module_names[1])}
    assert "conv_stem" in frozen and any(k.startswith("blocks.1.") for k in frozen)
    assert not any(k.startswith("blocks.2") for k in frozen)
    for k, v in files["2"].items():
        if k.rsplit(".", 1)[0] in frozen:
            np.testing.assert_array_equal(v, start_sd[k], err_msg=k)
    moved = [k for k, v in files["2"].items() if k.rsplit(".", 1)[0] not in frozen and not np.array_equal(v, start_sd[k])]
    assert any(k.startswith("blocks.2") for k in moved), "the deeper blocks did not train"
    assert not np.array_equal(files["0"]["conv_stem.weight"], start_sd["conv_stem.weight"])  # unfrozen: it trains


def test_freezing_every_level_is_refused(arrow_dir, tmp_path, capsys):
    from insightad.backbones import build_extractor

    start, _, _ = build_extractor("test_efficientnet", [0, 1, 2, 3, 4], None, pretrained=False)
    rc = main(["train", "--method", "ssl", "--data", str(arrow_dir), "--out", str(tmp_path / "b.safetensors"),
               "--freeze-levels", "5", *_from_weights_file(start, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "freeze_levels: test_efficientnet has 5 feature levels; at most 4" in err
    assert "Traceback" not in err and not (tmp_path / "b.safetensors").exists()


def test_a_fine_tuning_run_asks_for_huge_pages_before_pytorch_is_imported(tmp_path):
    """train --method ssl / --backbone ssl switch PyTorch's huge-page allocation on before importing it (it reads
    the switch once); other methods, a user's own setting and a process that already imported PyTorch are left
    alone."""
    import os
    import subprocess
    import sys

    probe = ("import os, sys\n"
             "import insightad.cli.train as t\n"
             "t.run = lambda a: print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules) or 0\n"
             "from insightad.cli import main\n"
             "main(sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def seen(*argv: str, **extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", probe, "train", "--data", "x", *argv], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert seen("--method", "ssl") == "1 True"
    assert seen("--method", "svdd", "--backbone", "ssl") == "1 True"
    assert seen("--method", "padim") == "None True"
    config = tmp_path / "run.toml"
    config.write_text('[train]\nmethod = "svdd"\nbackbone = "ssl"\n')
    assert seen("--config", str(config)) == "1 True"
    assert seen("--method", "ssl", THP_MEM_ALLOC_ENABLE="0") == "0 True"
    from insightad.runtime import huge_pages_for_tensors

    before = os.environ.get("THP_MEM_ALLOC_ENABLE")
    assert huge_pages_for_tensors() is False and os.environ.get("THP_MEM_ALLOC_ENABLE") == before  # torch is loaded


def test_a_fine_tune_without_huge_pages_says_how_to_have_them(tmp_path, monkeypatch):
    """A Python program that imported PyTorch without THP_MEM_ALLOC_ENABLE gets one warning naming the variable,
    where the kernel offers huge pages; not where it does not, nor when the variable is set (a user's 0 too)."""
    import warnings

    from insightad import runtime
    from insightad.backbones.ssl import SlowerWarning, warn_if_without_huge_pages

    mode = tmp_path / "enabled"
    monkeypatch.setattr(runtime, "THP_MODE_FILE", str(mode))
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)

    def said() -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warn_if_without_huge_pages()
        return [str(w.message) for w in seen if issubclass(w.category, SlowerWarning)]

    mode.write_text("always [madvise] never\n")
    assert len(said()) == 1 and "THP_MEM_ALLOC_ENABLE=1" in said()[0] and "before importing torch" in said()[0]
    mode.write_text("always madvise [never]\n")
    assert said() == []
    mode.unlink()
    assert said() == []  # no such file: not Linux's THP, nothing to say
    mode.write_text("[always] madvise never\n")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert said() == []


def test_the_memory_estimate_follows_the_measured_runs():
    """Defaults (all levels, recomputation, batch 32 x 3 at 256 px): 5.12-5.39 GB measured; --freeze-levels 2:
    3.2-3.3 GB; without recomputation 11.1 GB (docs/ssl.md)."""
    from insightad.backbones.ssl import SSLTrainer, peak_estimate

    gb = [peak_estimate(SSLTrainer(**kw).params) / 2**30 for kw in
          ({}, {"freeze_levels": 2}, {"recompute_activations": False}, {"image_size": 128})]
    assert 4.9 < gb[0] < 5.4 and 3.0 < gb[1] < 3.4 and 9.5 < gb[2] < 11.5 and gb[3] < gb[1]


@pytest.mark.parametrize("available, warned", [(2**20, True), (2**40, False)])
def test_a_fine_tune_says_before_it_starts_when_memory_looks_short(available, warned, arrow_dir, tmp_path, capsys,
                                                                   monkeypatch):
    import insightad.backbones.ssl

    monkeypatch.setattr(insightad.backbones.ssl, "available_memory", lambda: available)
    flags = [f if f != "3" else "1" for f in TINY_FLAGS]
    assert main(["train", "--method", "ssl", "--data", str(arrow_dir), "--out", str(tmp_path / "b.safetensors"),
                 "--pretext", "cutpaste", "--device", "cpu", *flags]) == 0
    err = capsys.readouterr().err
    assert ("insightad: warning: ssl: this fine-tune needs about" in err) is warned
    assert ("then --backbone ssl:FILE" in err) is warned  # where the one-command form cannot take --freeze-levels
    assert err.count("this fine-tune needs") <= 1 and "Traceback" not in err
