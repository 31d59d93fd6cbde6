"""Issue 12 point 8: every output path is checked before any work starts (one line naming the flag)."""

from __future__ import annotations

import pytest

from insightad.cli import main


@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if a command gets as far as training or loading a model."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the output path was checked")
    import insightad.apps.train
    import insightad.inference.load
    import insightad.model_file

    monkeypatch.setattr(insightad.apps.train, "train_model", forbidden)
    monkeypatch.setattr(insightad.apps.train, "train_backbone", forbidden)
    monkeypatch.setattr(insightad.inference.load, "load_for_inference", forbidden)
    monkeypatch.setattr(insightad.model_file, "load_model", forbidden)


def _refused(capsys, argv, *needles):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, err
    return err


def test_p8_train_out_existing_dir(folder_dir, tmp_path, capsys, no_work):
    _refused(capsys, ["train", "--data", folder_dir, "--out", tmp_path], "--out", "folder")
    _refused(capsys, ["train", "--method", "ssl", "--data", folder_dir, "--out", tmp_path], "--out")


def test_p8_train_out_unwritable(folder_dir, capsys, no_work):
    _refused(capsys, ["train", "--data", folder_dir, "--out", "/proc/nope/x.safetensors"], "--out", "/proc/nope")


def test_p8_train_out_under_a_file(folder_dir, tmp_path, capsys, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    _refused(capsys, ["train", "--data", folder_dir, "--out", f / "m.safetensors"], "--out", "is a file")


def test_p8_train_checkpoint_dir_is_a_file(folder_dir, tmp_path, capsys, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    _refused(capsys, ["train", "--method", "autoencoder", "--data", folder_dir, "--out", tmp_path / "m.safetensors",
                      "--checkpoint-dir", f], "--checkpoint-dir")


def test_p8_export_out_dir(baseline_model, tmp_path, capsys, no_work):
    _refused(capsys, ["export", "--model", baseline_model, "--out", tmp_path], "--out", "folder")


def test_p8_evaluate_report_proc(baseline_model, mvtec_dir, capsys, no_work):
    _refused(capsys, ["evaluate", "--model", baseline_model, "--data", mvtec_dir, "--report", "/proc/x"], "--report")


def test_p8_predict_overlay_and_heatmap_file(baseline_model, mvtec_dir, tmp_path, capsys, no_work):
    f = tmp_path / "file.png"
    f.write_text("x")
    image = next((mvtec_dir / "test" / "good").iterdir())
    _refused(capsys, ["predict", "--model", baseline_model, image, "--overlay", f], "--overlay", "is a file")
    _refused(capsys, ["predict", "--model", baseline_model, image, "--heatmap", f], "--heatmap", "is a file")


def test_p8_calibrate_out_proc_leaves_model_alone(baseline_model, mvtec_dir, capsys, no_work):
    before = baseline_model.read_bytes()
    _refused(capsys, ["calibrate", "--model", baseline_model, "--data", mvtec_dir, "--out", "/proc/x.json"], "--out")
    assert baseline_model.read_bytes() == before


def test_p8_demo_and_augment_out_file(folder_dir, tmp_path, capsys, monkeypatch):
    import insightad.data.synthetic

    monkeypatch.setattr(insightad.data.synthetic, "write_dataset", lambda *a, **k: pytest.fail("work started"))
    f = tmp_path / "file"
    f.write_text("x")
    _refused(capsys, ["demo", "--out", f], "--out", "is a file")
    _refused(capsys, ["augment", "--input", folder_dir / "normal", "--out", f], "--out", "is a file")


def test_p8_good_outputs_pass(tmp_path):
    from insightad.outputs import check_output_dir, check_output_file

    assert check_output_file(tmp_path / "a" / "b" / "m.safetensors", "--out").parent.is_dir()
    assert check_output_dir(tmp_path / "r", "--report").is_dir()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".insightad-probe")]
