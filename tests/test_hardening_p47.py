"""Sweep of evaluate's ground truth: mask files that no image uses (a mask whose stem names no image, a file in a
mask folder not named ``<stem>_mask``) and anomalous images without a mask were left out of the pixel metrics
without a word; now each is said in one warning line, and the table and report say how many images the pixel
metrics judged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightad.apps.train import train_model
from insightad.cli import main
from insightad.config import DataParams
from insightad.data.layouts import discover

from .conftest import SIZE


@pytest.fixture(scope="module")
def padim_model(mvtec_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p47") / "padim.safetensors"
    train_model(mvtec_dir, "padim", {"image_size": SIZE, "n_features": 24}, DataParams(), out, progress=False)
    return out


def _copy(mvtec_dir: Path, root: Path) -> Path:
    shutil.copytree(mvtec_dir, root)
    return root


def _first_mask(data: Path) -> Path:
    return sorted((data / "ground_truth").rglob("*_mask.png"))[0]


def test_p47_mask_of_no_image_is_named(mvtec_dir, tmp_path):
    data = _copy(mvtec_dir, tmp_path / "d")
    stray = _first_mask(data).with_name("999_mask.png")
    shutil.copy(_first_mask(data), stray)
    with pytest.warns(UserWarning, match=r"1 files in the mask folders .* belong to no anomalous image \(e\.g\. "
                                         rf"ground_truth/{stray.parent.name}/999_mask\.png\)"):
        discover(data)


def test_p47_misnamed_masks_are_named(mvtec_dir, tmp_path):
    data = _copy(mvtec_dir, tmp_path / "d")
    masks = sorted((data / "ground_truth").rglob("*_mask.png"))
    for m in masks:  # e.g. another dataset's naming: 000_gt.png
        m.rename(m.with_name(m.name.replace("_mask", "_gt")))
    with pytest.warns(UserWarning, match=rf"{len(masks)} files in the mask folders .* are not named "
                                         r"<stem>_mask\.<ext>"):
        ds = discover(data)
    assert all(s.mask is None for s in ds.samples)


def test_p47_a_complete_dataset_warns_nothing(mvtec_dir, folder_dir, recwarn):
    for data in (mvtec_dir, folder_dir):
        ds = discover(data)
        assert any(s.mask is not None for s in ds.samples)
    assert not [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]


def test_p47_folder_layout_mask_of_a_normal_image_is_not_an_orphan(folder_dir, tmp_path, recwarn):
    data = _copy(folder_dir, tmp_path / "d")
    normal = sorted((data / "normal").glob("*.png"))[0]
    with Image.open(normal) as im:
        Image.new("L", im.size).save(data / "masks" / f"{normal.stem}_mask.png")
    discover(data)
    assert not [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    stray = data / "masks" / "nothing_mask.png"
    Image.new("L", (8, 8)).save(stray)
    with pytest.warns(UserWarning, match=r"1 files in the mask folders .* belong to no anomalous image"):
        discover(data)


def test_p47_evaluate_says_which_images_the_pixel_metrics_left_out(padim_model, mvtec_dir, tmp_path, capsys):
    data = _copy(mvtec_dir, tmp_path / "d")
    gone = _first_mask(data)
    gone.unlink()
    image = data / "test" / gone.parent.name / f"{gone.stem[: -len('_mask')]}.png"
    assert image.is_file()
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(padim_model), "--data", str(data), "--report", str(report),
                 "--no-progress"]) == 0
    cap = capsys.readouterr()
    n_anomalous = sum(1 for d in (data / "test").iterdir() if d.name != "good" for _ in d.glob("*.png"))
    assert f"1 of {n_anomalous} anomalous images have no mask (e.g. {image})" in cap.err
    assert "1 anomalous images without a mask left out" in cap.out
    assert "1 anomalous images without a mask left out" in (report / "report.md").read_text()


def test_p47_evaluate_with_every_mask_prints_no_coverage_row(padim_model, mvtec_dir, capsys):
    assert main(["evaluate", "--model", str(padim_model), "--data", str(mvtec_dir), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "pixel_auroc" in cap.out and "pixel_images" not in cap.out and "no mask" not in cap.err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


@pytest.mark.parametrize("earlier", [False, True])
def test_p47_interrupted_report_leaves_no_half_report(baseline_model, mvtec_dir, tmp_path, monkeypatch, earlier):
    """Ctrl-C while the report's figures were drawn left per_defect.csv and .md of the new run beside the earlier
    run's figures and metrics.json; now the earlier report stays whole and nothing of the new one appears."""
    from insightad.evaluate import plots

    report = tmp_path / "report"
    cmd = ["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--report", str(report),
           "--no-progress"]
    if earlier:
        assert main(cmd + ["--threshold", "5"]) == 0  # other figures than the interrupted run would draw
    before = _files(report)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "defect_distributions", interrupted)
    assert main(cmd) == 130
    assert _files(report) == before  # (no earlier report: the folder this run made is gone, as on any failure)
    assert not earlier or "per_defect.csv" in before


def test_p47_draws_bounded(baseline_model, mvtec_dir, tmp_path, capsys):
    assert main(["evaluate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--draws", "100000000"]) == 1
    assert "--draws: expected 1 to 10000, got 100000000" in capsys.readouterr().err


def test_p47_generated_dataset_never_writes_over_other_files(tmp_path):
    """``demo --out project`` wrote its generated images over project/data/train/good/000.png... and trained on
    the user's own images there beside them; now a folder a generated dataset did not write is refused."""
    from insightad.data.synthetic import write_dataset
    from insightad.errors import InsightADError

    root = tmp_path / "data"
    (root / "train" / "good").mkdir(parents=True)
    mine = root / "train" / "good" / "000.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(mine)
    before = mine.read_bytes()
    with pytest.raises(InsightADError, match=r"data: already holds files that no generated dataset wrote \(e\.g\. "
                                             r"train\)"):
        write_dataset(root, n_train=2, n_test_good=1, n_per_defect=1, size=32)
    assert mine.read_bytes() == before and len(list(root.rglob("*.png"))) == 1
    with pytest.raises(InsightADError, match="expected a folder for the generated dataset, got a file"):
        write_dataset(mine, n_train=2, n_test_good=1, n_per_defect=1, size=32)


def test_p47_generated_dataset_rerun_replaces_the_earlier_one(tmp_path):
    from insightad.data.synthetic import write_dataset

    root = tmp_path / "data"
    write_dataset(root, n_train=3, n_test_good=2, n_per_defect=2, size=32, defects=("blob", "scratch"))
    write_dataset(root, n_train=2, n_test_good=1, n_per_defect=1, size=32, defects=("crack",), seed=5)
    ds = discover(root)
    assert sorted({s.defect for s in ds.samples}) == ["crack", "good"]  # no blob/scratch left from the first
    assert len(ds.samples) == 2 + 1 + 1


@pytest.fixture(scope="module")
def exported(baseline_model, tmp_path_factory) -> Path:
    from insightad.inference.export import export_onnx
    from insightad.model_file import load_model

    out = tmp_path_factory.mktemp("p47g") / "baseline.onnx"
    export_onnx(load_model(baseline_model), out)
    return out


def _edited(graph: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(graph.read_bytes())
    if how == "flipped bit":  # in the constants, which follow the metadata
        data[-200] ^= 0x01
    elif how == "threshold":  # a hand edit of the metadata's plain threshold entry, same length
        key = b"threshold\x12"
        at = bytes(data).index(key) + len(key) + 1
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
    else:  # a graph exported before checksums: no entry (here its key renamed)
        at = bytes(data).index(b"insightad_content_sha256")
        data[at:at + 9] = b"xnsightad"
    out = tmp_path / f"{how.replace(' ', '_')}.onnx"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("how", ["flipped bit", "threshold"])
def test_p47_an_edited_graph_is_refused(exported, mvtec_dir, tmp_path, capsys, how):
    """A graph whose constants or metadata changed after export scored silently (issue 14: a tampered graph is
    rebuilt or refused, never used); it carries a content checksum now."""
    image = str(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0])
    assert main(["predict", "--model", str(exported), image]) == 0
    bad = _edited(exported, tmp_path, how)
    capsys.readouterr()
    assert main(["predict", "--model", str(bad), image]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: the graph's content does not match its checksum" in err and err.count("\n") == 1
    assert main(["info", "--model", str(bad)]) == 1


def test_p47_a_graph_without_checksum_opens_as_before(exported, mvtec_dir, tmp_path):
    from insightad.inference.onnx_detector import OnnxDetector

    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    old = _edited(exported, tmp_path, "no checksum")
    got = OnnxDetector.from_file(old).predict([image]).scores
    np.testing.assert_allclose(got, OnnxDetector.from_file(exported).predict([image]).scores, rtol=1e-6)


def test_p47_an_edited_graph_beside_its_model_is_not_used(baseline_model, exported, mvtec_dir, tmp_path):
    from insightad.inference.load import load_for_inference

    model = tmp_path / "m.safetensors"
    shutil.copyfile(baseline_model, model)
    from insightad.inference.export import export_onnx
    from insightad.io import file_sha256
    from insightad.model_file import load_model

    export_onnx(load_model(model), model.with_suffix(".onnx"), file_sha256(model))  # stamped: this model's graph
    _edited(model.with_suffix(".onnx"), tmp_path, "flipped bit").replace(model.with_suffix(".onnx"))
    with pytest.warns(UserWarning, match="not the graph of"):
        det = load_for_inference(model, "onnx")
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    ref = load_for_inference(model, "torch").predict([image]).scores
    np.testing.assert_allclose(det.predict([image]).scores, ref, rtol=1e-4)


def test_p47_a_threshold_file_brings_its_scale(baseline_model, mvtec_dir, tmp_path, capsys):
    """``predict --threshold thr.json`` (from ``calibrate --dry-run --out``) decided at the file's threshold but
    normalised the scores with the model's older scale (0.31 against 0.15 for one image); the file's scale
    travels with its threshold now, so the figures equal those of the model once that calibration is stored."""
    import json

    model = tmp_path / "m.safetensors"
    shutil.copyfile(baseline_model, model)
    thr = tmp_path / "thr.json"
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--strategy", "f1", "--out", str(thr),
                 "--dry-run", "--no-progress"]) == 0
    images = [str(p) for p in sorted((mvtec_dir / "test" / "good").glob("*.png"))[:6]]  # scores near the threshold
    capsys.readouterr()

    def scored(*extra: str) -> list[dict]:
        assert main(["predict", "--model", str(model), "--json", *extra, *images]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    with_file = scored("--threshold", str(thr))
    value = json.loads(thr.read_text())["threshold"]
    number = scored("--threshold", repr(value))  # the same threshold as a number: the model's own scale, as before
    assert json.loads(thr.read_text())["details"]["scale"] > 0
    assert main(["calibrate", "--model", str(model), "--data", str(mvtec_dir), "--strategy", "f1",
                 "--no-progress"]) == 0  # the same calibration, stored in the model this time
    capsys.readouterr()
    stored = scored()
    assert [r["threshold"] for r in with_file] == pytest.approx([r["threshold"] for r in stored])
    assert [r["score_normalized"] for r in with_file] == pytest.approx([r["score_normalized"] for r in stored])
    assert [r["score_normalized"] for r in with_file] != pytest.approx([r["score_normalized"] for r in number])


def test_p47_a_threshold_file_scale_must_be_a_positive_number(baseline_model, mvtec_dir, tmp_path, capsys):
    import json

    from insightad.apps.threshold_file import FileThreshold, read_threshold_file

    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"threshold": 3.5, "scale": 0.25}))
    got = read_threshold_file(thr)
    assert got == 3.5 and got.scale == 0.25 and isinstance(got, FileThreshold)
    import pickle

    assert pickle.loads(pickle.dumps(got)).scale == 0.25  # as batch sends it to its workers
    thr.write_text(json.dumps({"threshold": 3.5, "scale": -1}))
    image = str(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0])
    assert main(["predict", "--model", str(baseline_model), "--threshold", str(thr), image]) == 1
    assert "'scale' must be a positive JSON number, got -1" in capsys.readouterr().err


def test_p47_train_graph_warning_is_an_insightad_warning_line(mvtec_dir, tmp_path, monkeypatch, capsys):
    """train's "no ONNX graph written" warning went out as a bare "warning: ..." line, unlike every other warning."""
    import insightad.apps.train as train_app

    monkeypatch.setattr(train_app, "write_graph_beside",
                        lambda det, path, release=False: (None, "warning: no ONNX graph written (x)"))
    assert main(["train", "--data", str(mvtec_dir), "--method", "baseline", "--image-size", "32",
                 "--out", str(tmp_path / "m.safetensors"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "insightad: warning: no ONNX graph written (x)\n" in cap.err and "no ONNX graph" not in cap.out


def test_p47_resume_after_a_time_budget_stop_equals_the_uninterrupted_run(tmp_path):
    """A run stopped by --time-budget in the middle of an epoch checkpointed that partial epoch as complete: the
    resumed run skipped its unseen batches. Now the checkpoint keeps the last complete epoch, and the resumed run
    ends with exactly the weights of a run never stopped."""
    import torch

    from insightad.training.loop import TrainingLoop

    from .test_training_loop import Classify, FakeClock, TinyNet, _images, _params, _same

    data = _images()
    torch.manual_seed(0)
    straight = TinyNet()
    TrainingLoop(_params(tmp_path / "a", epochs=4), name="tiny").run(straight, Classify(), data[:18], data[18:])

    torch.manual_seed(0)
    stopped = TinyNet()
    # 4 steps an epoch, 1 s a step: 6 s stop after the 2nd step of epoch 2
    result = TrainingLoop(_params(tmp_path / "b", epochs=4, time_budget=6.0), name="tiny",
                          clock=FakeClock(1.0)).run(stopped, Classify(), data[:18], data[18:])
    assert result.stop_reason == "time_budget" and result.history[-1]["train_fraction"] < 1
    torch.manual_seed(0)
    resumed = TinyNet()
    again = TrainingLoop(_params(tmp_path / "b", epochs=4, resume=True), name="tiny").run(
        resumed, Classify(), data[:18], data[18:])
    assert again.resumed_from == 1 and again.epochs_run == 4
    assert _same(resumed, straight)
