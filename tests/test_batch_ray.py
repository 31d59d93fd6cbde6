"""insightad batch and train on Ray: a local instance (ray.init(num_cpus=2)) and a two-node cluster on this
machine give the local runner's rows; an actor killed mid-run loses and duplicates nothing; a distributed
PaDiM fit equals the single-process fit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from insightad.apps.batch import BatchJob, ResultsStore, list_source, run_local  # noqa: E402
from insightad.apps.batch_ray import Scorer, run_ray  # noqa: E402
from insightad.inference.load import load_for_inference  # noqa: E402

ODD = b"caf\xe9.png"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(mvtec_dir, tmp_path_factory) -> Path:
    """12 readable images (one with a non-UTF-8 name) and a corrupt one."""
    root = tmp_path_factory.mktemp("rayin") / "in"
    root.mkdir()
    for d in ("good", "blob", "crack", "scratch"):
        for i in range(3):
            shutil.copy(mvtec_dir / "test" / d / f"00{i}.png", root / f"{d}{i}.png")
    os.rename(root / "good2.png", os.path.join(os.fsencode(root), ODD))
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def local_rows(inputs, baseline_model, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "r.parquet"
    det = load_for_inference(baseline_model, "torch", threads=1)
    run_local(BatchJob(Path(baseline_model), list_source(str(inputs)), ResultsStore(out), chunk=4), det)
    return pq.read_table(out).to_pylist()


def _ray_rows(inputs, model, out: Path, scorer=Scorer, workers: int = 2, address: str = "local") -> list[dict]:
    job = BatchJob(Path(model), list_source(str(inputs)), ResultsStore(out), chunk=4)
    s = run_ray(job, load_for_inference(model, "torch").threshold_, address, workers, engine="torch", scorer=scorer)
    assert s.errors == 1 and s.scored == 13 and s.skipped == 0
    return pq.read_table(out).to_pylist()


def _same(rows: list[dict], ref: list[dict]) -> None:
    assert [r["path_bytes"] for r in rows] == [r["path_bytes"] for r in ref]  # one row each, same order
    assert len({r["path_bytes"] for r in rows}) == len(rows) == 13
    assert [r["error"] is None for r in rows] == [r["error"] is None for r in ref]
    ok = [i for i, r in enumerate(ref) if r["error"] is None]
    np.testing.assert_allclose([rows[i]["score"] for i in ok], [ref[i]["score"] for i in ok], rtol=1e-5)
    assert [rows[i]["anomalous"] for i in ok] == [ref[i]["anomalous"] for i in ok]
    assert any(r["path_bytes"].endswith(ODD) and r["error"] is None for r in rows)


def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, inputs, baseline_model, local_rows, tmp_path):
    """Ray local gives the local runner's rows (scores within 1e-5), even when an actor is killed mid-run."""
    marker = str(tmp_path / "killed")

    class DiesOnce(Scorer):  # the first actor to reach its second chunk is killed while scoring it
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    import time

                    ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
                    time.sleep(10)
                    os._exit(1)  # not reached when the kill lands first
            return super().__call__(batch)

    rows = _ray_rows(inputs, baseline_model, tmp_path / "r.parquet", scorer=DiesOnce)
    assert os.path.exists(marker)
    _same(rows, local_rows)


def _covariance(det) -> np.ndarray:
    import torch

    chol = torch.linalg.inv(det.model_.inv_chol.double())
    return (chol @ chol.transpose(1, 2)).numpy()


def test_distributed_padim_fit_equals_single_process(ray_local, mvtec_dir):
    from insightad.apps.train_ray import ray_shards
    from insightad.methods import create_detector

    images = sorted((mvtec_dir / "train" / "good").glob("*.png"))[:12]
    params = {"image_size": 64, "batch_size": 4, "fit_engine": "torch"}
    one = create_detector("padim", **params).fit(images)
    two = create_detector("padim", **params).fit(images, shards=ray_shards("padim", params, workers=2))
    np.testing.assert_allclose(two.model_.mean.numpy(), one.model_.mean.numpy(), rtol=1e-4, atol=1e-5)
    cov_one, cov_two = _covariance(one), _covariance(two)  # the statistics; their inverse factors amplify noise
    np.testing.assert_allclose(cov_two, cov_one, rtol=1e-4, atol=1e-5 * np.abs(cov_one).max())
    test = sorted((mvtec_dir / "test" / "crack").glob("*.png"))
    np.testing.assert_allclose(two.predict(test).scores, one.predict(test).scores, rtol=1e-4)
    assert two.threshold_ == pytest.approx(one.threshold_, rel=1e-4)
    assert two.threshold_strategy_ == one.threshold_strategy_


def test_sort_on_ray_keeps_its_crash_safety(ray_local, inputs, baseline_model, local_rows, tmp_path):
    from insightad.apps.batch_ray import sort_scorer
    from insightad.apps.sort import CSV_NAME, FolderSorter

    src = tmp_path / "src"
    src.mkdir()
    for p in [q for q in sorted(inputs.glob("*.png")) if q.name.isascii()][:9]:
        shutil.copy(p, src / p.name)
    det = load_for_inference(baseline_model, "torch")
    scorer = sort_scorer(Path(baseline_model), det.threshold_, workers=2, chunk=3, engine="torch")
    seen = []

    def crash(stage: str, what: str) -> None:  # killed after the first file of the second chunk is in place
        seen.append(stage)
        if stage == "transferred" and seen.count("intents") == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FolderSorter(det, src, tmp_path / "out", batch_size=3, hook=crash, scorer=scorer).run()
    s = FolderSorter(det, src, tmp_path / "out", batch_size=3, scorer=scorer).run()
    assert s.recovered >= 1  # the interrupted chunk's journaled decisions were finished, not scored again
    import csv

    with open(tmp_path / "out" / CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in src.glob("*.png"))  # once each
    placed = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert placed == sorted(r["path"].rsplit("/", 1)[1] for r in rows if r["decision"] != "error")
    ref = {os.fsdecode(r["path_bytes"]).rsplit("/", 1)[1]: r for r in local_rows}
    for r in rows:
        want = ref[Path(r["path"]).name]
        assert r["decision"] == ("error" if want["error"] else "anomalous" if want["anomalous"] else "normal")


def test_two_node_cluster_gives_the_same_rows(inputs, baseline_model, local_rows, tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test runs last in the module: it replaces the local instance by a cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        _same(_ray_rows(inputs, baseline_model, tmp_path / "r.parquet", address=cluster.address), local_rows)
    finally:
        ray.shutdown()
        cluster.shutdown()
