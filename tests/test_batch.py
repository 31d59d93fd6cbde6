"""insightad batch in one process: one row per input, predict's scores, error rows, resume after an
interruption, merge without duplicates, the output lock, non-UTF-8 names, list and glob sources."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from insightad.apps.batch import BatchJob, ResultsStore, file_sha256, list_source, run_local
from insightad.cli import main
from insightad.inference.load import load_for_inference
from insightad.io import file_lock

ODD = os.fsencode("odd") + b"_caf\xe9.png"  # not valid UTF-8


@pytest.fixture(scope="module")
def det(baseline_model):
    return load_for_inference(baseline_model, "torch")


@pytest.fixture
def inputs(mvtec_dir, tmp_path) -> Path:
    """9 readable images in two folders (one with a non-UTF-8 name), a corrupt .png, a text file."""
    root = tmp_path / "in"
    (root / "b").mkdir(parents=True)
    for d in ("good", "blob", "crack", "scratch"):
        shutil.copy(mvtec_dir / "test" / d / "000.png", root / f"{d}.png")
        shutil.copy(mvtec_dir / "test" / d / "001.png", root / "b" / f"{d}.png")
    shutil.copy(mvtec_dir / "test" / "good" / "002.png", os.path.join(os.fsencode(root / "b"), ODD))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist()


def _check_one_row_each(rows: list[dict], root: Path) -> None:
    got = sorted(r["path_bytes"] for r in rows)
    want = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.fsencode(root)) for f in fs if f.endswith(b".png"))
    assert got == want  # exactly one row per input, no duplicate


def test_batch_rows_scores_errors_and_odd_names(det, inputs, tmp_path, baseline_model, capsys):
    out = tmp_path / "r.parquet"
    # one chunk holds every input, so the forward batches are predict's (float results depend on batch make-up)
    rc = main(["batch", "--model", str(baseline_model), "--input", str(inputs), "--out", str(out), "--engine", "torch",
               "--csv", str(tmp_path / "r.csv")])
    text = capsys.readouterr()
    assert rc == 1 and "1 errors" in text.out and "broken.png" in text.err  # an error row makes the exit non-zero
    rows = _rows(out)
    _check_one_row_each(rows, inputs)
    bad = [r for r in rows if r["error"] is not None]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and bad[0]["score"] is None
    assert bad[0]["anomalous"] is None
    ok = [r for r in rows if r["error"] is None]
    pred = det.predict([os.fsdecode(r["path_bytes"]) for r in ok], maps=False)
    np.testing.assert_allclose([r["score"] for r in ok], pred.scores, rtol=1e-5)
    assert [r["anomalous"] for r in ok] == list(pred.labels)
    assert {r["model_sha256"] for r in rows} == {file_sha256(baseline_model)}
    odd = [r for r in rows if r["path_bytes"].endswith(ODD)]
    assert len(odd) == 1 and odd[0]["error"] is None and odd[0]["path"].endswith("odd_caf\\xe9.png")
    assert os.path.isfile(odd[0]["path_bytes"])  # the exact bytes name the file
    assert (tmp_path / "r.csv").read_text().count("\n") == len(rows) + 1
    assert not (tmp_path / "r.parquet.parts").exists()


def test_interrupted_run_resumes_without_loss_or_duplicates(det, inputs, tmp_path, baseline_model):
    out = tmp_path / "r.parquet"
    job = BatchJob(Path(baseline_model), list_source(str(inputs)), ResultsStore(out), chunk=3)

    class Dies:  # the detector of a run killed during its third chunk
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name):
            return getattr(det, name)

        def predict(self, *a, **k):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return det.predict(*a, **k)

    with pytest.raises(KeyboardInterrupt):
        run_local(job, Dies())
    assert len(list(job.store.parts_dir.glob("part-*.parquet"))) == 2 and not out.exists()
    s = run_local(BatchJob(Path(baseline_model), list_source(str(inputs)), ResultsStore(out), chunk=3), det)
    assert s.skipped == 5 and s.scored == 5 and s.retried == 1 and s.errors == 1  # the error row is tried again
    rows = _rows(out)
    _check_one_row_each(rows, inputs)
    # a kill after the merge was renamed but before the parts were deleted: a part repeats merged rows
    ResultsStore(out).commit(pq.read_table(out).slice(0, 4))
    s = run_local(BatchJob(Path(baseline_model), list_source(str(inputs)), ResultsStore(out), chunk=3), det)
    assert s.scored == 1 and s.skipped == 9 and s.retried == 1
    _check_one_row_each(_rows(out), inputs)


def test_lock_refuses_a_second_run(inputs, tmp_path, baseline_model, capsys):
    out = tmp_path / "r.parquet"
    with file_lock(ResultsStore(out).lock_path, str(out)):
        rc = main(["batch", "--model", str(baseline_model), "--input", str(inputs), "--out", str(out),
                   "--engine", "torch"])
    err = capsys.readouterr().err
    assert rc == 1 and "another run is writing it" in err and str(os.getpid()) in err
    assert not out.exists()


def test_list_and_glob_sources(inputs, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"in/good.png\n# a comment\n\nin/b/" + ODD + b"\nin/missing.png\nin/good.png\n")
    src = list_source(str(listing))
    assert [os.path.basename(p) for p in src.paths] == [b"good.png", ODD, b"missing.png"]  # kept, once each
    g = list_source(str(inputs / "**" / "*.png"))
    assert len(g.paths) == 10 and g.root == os.fsencode(inputs)
    with pytest.raises(Exception, match="no such folder, file or glob"):
        list_source(str(tmp_path / "nope"))


def test_missing_listed_file_is_an_error_row(det, inputs, tmp_path, baseline_model):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{inputs / 'good.png'}\n{inputs / 'gone.png'}\n")
    out = tmp_path / "r.parquet"
    s = run_local(BatchJob(Path(baseline_model), list_source(str(listing)), ResultsStore(out)), det)
    rows = _rows(out)
    assert s.errors == 1 and len(rows) == 2
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert by_name["good.png"]["error"] is None and "file not found" in by_name["gone.png"]["error"]


def test_batch_without_ray_installed_says_how(monkeypatch, inputs, tmp_path, baseline_model, capsys):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    rc = main(["batch", "--model", str(baseline_model), "--input", str(inputs), "--out", str(tmp_path / "r.parquet"),
               "--ray", "local"])
    assert rc == 1 and "pip install 'insightad[ray]'" in capsys.readouterr().err


def _in_process_shards(method: str, params: dict, k: int):
    """A ShardRunner without Ray: ``k`` contiguous shards, each on a fresh detector (as a Ray task does)."""
    from insightad.methods import create_detector

    def run(name, images):
        b = [round(i * len(images) / k) for i in range(k + 1)]
        return [getattr(create_detector(method, **params), name)(list(images[x:y])) for x, y in zip(b, b[1:])]

    return run


@pytest.mark.parametrize("method", ["padim", "patchcore", "baseline"])
def test_sharded_fit_equals_single_process_fit(method, mvtec_dir):
    """The reduction hooks (PaDiM's summed statistics, gathered features) give the single-process model."""
    import torch

    from insightad.methods import create_detector

    images = sorted((mvtec_dir / "train" / "good").glob("*.png"))[:10]
    params = {"image_size": 64, "batch_size": 4, "fit_engine": "torch"}
    one = create_detector(method, **params).fit(images)
    many = create_detector(method, **params).fit(images, shards=_in_process_shards(method, params, 3))
    for name, t in one.model_.state_dict().items():
        if t.is_floating_point() and t.numel() and name.split(".")[0] not in ("extractor", "normalize"):
            got = many.model_.state_dict()[name]
            if name == "inv_chol":  # compare the covariances: the inverse factors amplify float32 noise
                t, got = (torch.linalg.inv(x.double()) for x in (t, got))
                t, got = t @ t.transpose(1, 2), got @ got.transpose(1, 2)
            np.testing.assert_allclose(got.numpy(), t.numpy(), rtol=1e-4, atol=1e-5 * float(t.abs().max()),
                                       err_msg=name)
    assert many.threshold_ == pytest.approx(one.threshold_, rel=1e-4)
    test = sorted((mvtec_dir / "test" / "crack").glob("*.png"))
    np.testing.assert_allclose(many.predict(test).scores, one.predict(test).scores, rtol=1e-4)


def test_sharded_fit_refused_where_fit_is_not_a_reduction(mvtec_dir):
    from insightad.errors import InsightADError
    from insightad.methods import create_detector

    det = create_detector("padim", image_size=64, reduction="pca")
    with pytest.raises(InsightADError, match="reduction=pca"):
        det.fit(sorted((mvtec_dir / "train" / "good").glob("*.png"))[:4], shards=_in_process_shards("padim", {}, 2))
