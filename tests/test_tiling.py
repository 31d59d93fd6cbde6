"""Tiled work: a smooth map tiles back with no seam, tiles batch through the model, a tiled model
fits, saves, loads and exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from insightad.config import DataParams
from insightad.errors import InsightADError
from insightad.methods import create_detector
from insightad.methods.tiling import TiledModel, blend_window, cut, stitch, tile_starts, tile_stride, working_size


def test_grid_covers_the_image():
    assert working_size(64, 3, 0.25) == 64 + 2 * 48
    assert tile_starts(160, 64, 48) == [0, 48, 96]
    assert tile_starts(64, 64, 48) == [0]
    assert tile_stride(64, 0.75) == 16


def test_smooth_map_stitches_back_without_a_seam():
    size, t = working_size(32, 4, 0.25), 32
    yy, xx = torch.meshgrid(torch.linspace(0, 3, size), torch.linspace(0, 2, size), indexing="ij")
    smooth = (torch.sin(yy) * torch.cos(xx))[None]
    tiles = cut(smooth[:, None], t, tile_stride(t, 0.25))[:, 0]
    back = stitch(tiles, size, tile_stride(t, 0.25), blend_window(t))
    assert torch.allclose(back, smooth, atol=1e-5)
    # Tiles that disagree (a constant offset on every other tile): the window spreads the change over the
    # overlap, where a plain average of the tiles jumps at each tile's edge.
    stride = tile_stride(t, 0.5)
    size = working_size(t, 4, 0.5)
    tiles = torch.zeros(16, t, t) + (torch.arange(16.0) % 2)[:, None, None]
    blended = stitch(tiles, size, stride, blend_window(t))
    flat = stitch(tiles, size, stride, torch.ones(t, t))
    assert flat.diff(dim=2).abs().max() >= 0.5
    assert blended.diff(dim=2).abs().max() < 0.3 and blended.diff(dim=1).abs().max() < 0.3


class _Inner(torch.nn.Module):
    """Scores = tile mean, maps = the first channel: enough to check the bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        m = x[:, 0].float()
        return m.mean((1, 2)), m


def test_tiled_model_batches_tiles_and_keeps_image_scores():
    inner = _Inner()
    model = TiledModel(inner, 16, 4, 0.5)
    x = torch.randint(0, 255, (5, 3, model.size, model.size), dtype=torch.uint8)
    scores, maps = model(x)
    assert scores.shape == (5,) and maps.shape == (5, model.size, model.size)
    assert max(inner.calls) <= 16 and sum(inner.calls) == 5 * 16
    assert torch.allclose(maps, x[:, 0].float(), atol=1e-3)


def test_tiled_padim_fits_saves_loads_and_exports(mvtec_dir, tmp_path):
    from insightad.apps.train import train_model
    from insightad.data.layouts import discover
    from insightad.inference.export import export_onnx
    from insightad.model_file import load_model

    det, path, _ = train_model(mvtec_dir, "padim", {"image_size": 32, "tile": 2, "overlap": 0.25, "n_features": 24},
                               DataParams(), tmp_path / "m.safetensors", progress=False)
    assert isinstance(det.model_, TiledModel) and det.preprocessing_.size == (56, 56)
    test = [s.path for s in discover(mvtec_dir).test][:4]
    pred = det.predict(test)
    back = load_model(path)
    np.testing.assert_allclose(back.predict(test).scores, pred.scores, rtol=1e-5)
    assert pred.maps[0].shape == Image.open(test[0]).size[::-1]
    assert export_onnx(back, tmp_path / "m.onnx").stat().st_size > 0  # verified against PyTorch inside


def test_cli_predict_retiles_a_model_and_refuses_what_cannot(mvtec_dir, tmp_path, capsys):
    from insightad.cli import main

    model = tmp_path / "b.safetensors"
    assert main(["train", "--data", str(mvtec_dir), "--method", "baseline", "--image-size", "32",
                 "--out", str(model)]) == 0
    image = str(next(iter(sorted((mvtec_dir / "test").rglob("*.png")))))
    capsys.readouterr()
    assert main(["predict", "--model", str(model), image, "--json", "--tile", "2", "--engine", "torch"]) == 0
    assert '"score"' in capsys.readouterr().out
    assert main(["predict", "--model", str(model), image, "--search", "hnsw"]) != 0
    assert "--search: only patchcore" in capsys.readouterr().err
    with pytest.raises(InsightADError, match="tile"):
        create_detector("padim", tile=0)


def test_train_notes_large_images_that_could_be_tiled(tmp_path, capsys):
    from insightad.apps.train import large_images_note
    from insightad.cli import main

    paths = []
    for i, side in enumerate((300, 310, 320)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((side, side + 20, 3), 90 + i, np.uint8)).save(paths[-1])
    note = large_images_note(paths, {"image_size": 100, "tile": 1})
    assert note is not None and "about 330 x 310 px" in note and "3.1 times smaller" in note and "try --tile 2" in note
    # PaDiM's per-position Gaussians lose on tiles (bottle image AUROC 1.000 -> 0.985): PatchCore is what is measured
    assert "try --method patchcore --tile 2" in large_images_note(paths, {"image_size": 100, "tile": 1}, "padim")
    assert large_images_note(paths, {"image_size": 110, "tile": 1}) is None  # 310 / 110 < 3
    assert large_images_note(paths, {"image_size": 100, "tile": 2}) is None  # tiled already
    assert large_images_note(paths, {"image_size": 100}) is None  # a method that cannot tile (svdd)
    assert large_images_note([tmp_path / "gone.png"], {"image_size": 100, "tile": 1}) is None

    from insightad.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "big", kind="plate", layout="folder", n_train=8, n_test_good=2, n_per_defect=1,
                         size=200, seed=4)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--method", "baseline", "--image-size", "64", "--holdout", "0",
                 "--threshold-strategy", "percentile", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "note: the training images are about 200 x 200 px and are scored at 64 px" in capsys.readouterr().err
    # who typed --tile 1 (or set it in --config) chose it: no note suggesting otherwise
    assert main(["train", "--data", str(data), "--method", "baseline", "--image-size", "64", "--holdout", "0",
                 "--tile", "1", "--threshold-strategy", "percentile", "--out", str(tmp_path / "m1.safetensors")]) == 0
    assert "note: the training images" not in capsys.readouterr().err
    (tmp_path / "tile.toml").write_text("tile = 1\n", encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "tile.toml"), "--data", str(data), "--method", "baseline",
                 "--image-size", "64", "--holdout", "0", "--threshold-strategy", "percentile",
                 "--out", str(tmp_path / "m2.safetensors")]) == 0
    assert "note: the training images" not in capsys.readouterr().err
