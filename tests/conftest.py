"""Shared fixtures: small generated datasets and a fitted baseline, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("INSIGHTAD_OFFLINE", "1")  # tests never reach for the network
# PyTorch's own default (no huge pages; torch is imported above, so it changes nothing): the tests' small fine-tunes
# do not warn that they could run faster (runtime.huge_pages_missed; tested in test_ssl with the variable unset).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")
if "INSIGHTAD_CACHE" not in os.environ:  # exported ONNX graphs are cached per test session, not in ~/.cache
    import tempfile

    os.environ["INSIGHTAD_CACHE"] = tempfile.mkdtemp(prefix="insightad-test-cache-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SIZE = 64  # working resolution for tests: small keeps the suite fast on 2 cores


@pytest.fixture(scope="session")
def mvtec_dir(tmp_path_factory) -> Path:
    """A synthetic MVTec AD category: 30 good train images, 8 good + 4x4 defective test images, masks."""
    from insightad.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("mvtec") / "disc", kind="disc", layout="mvtec", n_train=30,
                         n_test_good=8, n_per_defect=4, size=96, seed=1)


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory) -> Path:
    from insightad.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("folder") / "parts", kind="plate", layout="folder", n_train=24,
                         n_test_good=6, n_per_defect=3, size=96, seed=2)


@pytest.fixture(scope="session")
def crack_dir(tmp_path_factory) -> Path:
    from insightad.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("crack") / "concrete", kind="weave", layout="crack", n_train=24,
                         n_test_good=6, n_per_defect=4, defects=("crack",), size=96, seed=3, image_format="jpg")


def good_test_images(mvtec_dir: Path, folder: Path, n: int, prefix: str = "") -> Path:
    """``folder`` (made) holding copies of the first ``n`` good test images of ``mvtec_dir``, named
    ``<prefix><i>.png``: inputs a test may change or fill with outputs."""
    import shutil

    folder.mkdir()
    for i, p in enumerate(sorted((mvtec_dir / "test" / "good").glob("*.png"))[:n]):
        shutil.copy(p, folder / f"{prefix}{i}.png")
    return folder


@pytest.fixture(scope="session")
def baseline_model(mvtec_dir, tmp_path_factory) -> Path:
    """A baseline model file trained on ``mvtec_dir`` at test resolution."""
    from insightad.apps.train import train_model
    from insightad.config import DataParams

    out = tmp_path_factory.mktemp("models") / "baseline.safetensors"
    train_model(mvtec_dir, "baseline", {"image_size": SIZE}, DataParams(), out, progress=False)
    return out


GRAPH_BESIDE_TESTS = ("test_graph_beside", "test_hardening_p31")  # modules that check the ONNX graph beside the model file


@pytest.fixture(autouse=True)
def _no_graph_beside(request, monkeypatch):
    """``train`` writes a verified ONNX graph beside every model (seconds per export); the ~50 other CLI trainings
    of the suite skip it to keep the suite fast, as with --no-onnx. test_graph_beside checks the real thing."""
    if request.module.__name__.rsplit(".", 1)[-1] in GRAPH_BESIDE_TESTS:
        return
    import insightad.apps.train as train_app

    monkeypatch.setattr(train_app, "write_graph_beside",
                        lambda det, path, release=False: (None, "no ONNX graph written (test suite: see tests/conftest.py)"))
