"""PatchCore on synthetic data: maps find defects, the coreset and kNN are exact, the bank does not
depend on how it was gathered, model files round-trip, and the CLI (heatmaps, bad flags) behaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from insightad.cli import main
from insightad.config import DataParams
from insightad.data.layouts import discover
from insightad.errors import InsightADError
from insightad.methods import create_detector
from insightad.methods.components.coreset import coreset_size, greedy_coreset
from insightad.methods.components.knn import nearest
from insightad.render.names import output_names
from tests.conftest import SIZE


@pytest.fixture(scope="module")
def patchcore(mvtec_dir):
    from insightad.apps.train import train_model

    det, path, _ = train_model(mvtec_dir, "patchcore", {"image_size": SIZE, "coreset_ratio": 0.25}, DataParams(),
                               mvtec_dir.parent / "patchcore.safetensors", progress=False)
    return det, path


def test_maps_light_up_on_defects(patchcore, mvtec_dir):
    from insightad.evaluate.run import evaluate_model

    det, _ = patchcore
    ev = evaluate_model(det, mvtec_dir, DataParams(), progress=False)
    assert ev.metrics["pixel_auroc"] > 0.85, ev.metrics
    assert ev.metrics["image_auroc"] > 0.8, ev.metrics
    assert det.model_.bank.shape == (coreset_size(30 * 8 * 8, 0.25), 152)
    assert det.threshold_strategy_ == "leave_one_image_out_p99" and det.threshold_info_["n"] == 16
    # The default threshold sits above the normal training images' honest scores.
    assert det.threshold_ >= np.median(det.decision_scores_) > 0


def _naive_greedy(x: torch.Tensor, k: int, first: int) -> list[int]:
    chosen, nearest_d = [first], torch.cdist(x, x[first:first + 1])[:, 0]
    while len(chosen) < k:
        nxt = int(torch.argmax(nearest_d))
        chosen.append(nxt)
        nearest_d = torch.minimum(nearest_d, torch.cdist(x, x[nxt:nxt + 1])[:, 0])
    return chosen


@pytest.mark.parametrize("groups", [0, 8, None])
def test_greedy_coreset_matches_the_textbook_algorithm(groups):
    """Clustered data, as patch features are; the pruned search picks exactly what the naive one does."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(12, 6, generator=g) * 4
    x = (centres[torch.randint(12, (1500,), generator=g)] + torch.randn(1500, 6, generator=g)).double()
    got = greedy_coreset(x.float(), 120, seed=7, groups=groups)
    want = _naive_greedy(x, 120, int(got[0]))
    assert got.tolist() == want
    assert greedy_coreset(x.float(), 5000).tolist() == list(range(1500))  # k >= N keeps everything


def test_nearest_neighbours_are_exact_and_respect_banned_rows():
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(300, 10, generator=g), torch.randn(90, 10, generator=g)
    banned = torch.zeros(90, dtype=torch.bool)
    banned[::3] = True
    full = torch.cdist(q.double(), bank.double())
    for mask in (None, banned):
        d, i = nearest(q, bank, mask)
        ref = full.masked_fill(mask, float("inf")) if mask is not None else full
        torch.testing.assert_close(d.double(), ref.min(1).values, rtol=1e-5, atol=1e-4)
        assert (i == ref.argmin(1)).float().mean() > 0.99
        if mask is not None:
            assert not mask[i].any()


def test_hnsw_search_finds_the_nearest_and_is_deterministic():
    from insightad.methods.components.knn import HnswIndex, exact_maxima, resolve_search

    g = torch.Generator().manual_seed(2)
    bank = torch.randn(3000, 24, generator=g)
    q = bank[:500] + 0.3 * torch.randn(500, 24, generator=g)
    d, i = nearest(q, bank)
    dh, ih = HnswIndex(bank).search(q)
    assert ((ih == i) | (dh <= d + 1e-5)).float().mean() >= 0.99
    torch.testing.assert_close(dh[ih == i], d[ih == i], rtol=1e-4, atol=1e-4)
    assert torch.equal(HnswIndex(bank).search(q)[1], ih)  # the same bank gives the same graph
    # A rare miss lands far away; the image's largest distance is made exact whatever the misses.
    missed = torch.zeros_like(dh).view(5, 100)
    missed[:, 7] = 50.0
    dr, ir = exact_maxima(q.view(5, 100, -1), dh.view(5, 100) + missed, ih.view(5, 100), bank)
    torch.testing.assert_close(dr.max(1).values, d.view(5, 100).max(1).values)
    assert torch.equal(ir.gather(1, dr.argmax(1, keepdim=True)), i.view(5, 100).gather(1, d.view(5, 100).argmax(1, keepdim=True)))
    assert resolve_search("auto") in ("hnsw", "exact") and resolve_search("exact") == "exact"


def test_model_files_from_before_search_and_score_top_keep_exact_search_and_maximum(patchcore):
    import json

    from safetensors.torch import load_file, save_file

    from insightad.model_file import META_KEY, load_model, read_metadata

    det, path = patchcore
    meta = read_metadata(path)
    del meta["params"]["search"], meta["params"]["score_top"]  # as written before the settings existed
    del meta["content_sha256"]  # (and before model files carried a checksum)
    old = path.parent / "patchcore-old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={META_KEY: json.dumps(meta)})
    assert load_model(old).model_.search == "exact"
    assert load_model(old).model_.score_top == 0.0  # the paper's re-weighted maximum, as it was fitted


def test_second_pass_builds_the_same_bank(mvtec_dir):
    """Features cached in memory, or recomputed in a second pass (a large training set): same model."""
    train = [s.path for s in discover(mvtec_dir).train][:10]
    kw = {"image_size": SIZE, "coreset_ratio": 0.1, "threshold_images": 4, "workers": 0, "batch_size": 4}
    cached = create_detector("patchcore", **kw).fit(train)
    streamed = create_detector("patchcore", feature_cache_mb=0, **kw).fit(train)
    torch.testing.assert_close(cached.model_.bank, streamed.model_.bank)
    np.testing.assert_allclose(cached.decision_scores_, streamed.decision_scores_, rtol=1e-5)
    assert cached.threshold_ == pytest.approx(streamed.threshold_, rel=1e-5)


def test_model_file_round_trips_to_identical_scores(patchcore, mvtec_dir):
    from insightad.model_file import load_model

    det, path = patchcore
    test = [s.path for s in discover(mvtec_dir).test][:6]
    before, after = det.predict(test), load_model(path).predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps[3], after.maps[3])


def test_predict_runs_the_backbone_on_the_fit_engine_with_the_same_scores(patchcore, mvtec_dir):
    """On the CPU, predict runs the frozen backbone through the fit's engine (ONNX Runtime here): the same
    scores and maps as the PyTorch backbone, and an export (verify included) still traces PyTorch."""
    from insightad.model_file import load_model

    _, path = patchcore
    det = load_model(path)
    test = [s.path for s in discover(mvtec_dir).test][:6]
    fast = det.predict(test)
    model = det.model_
    assert model.features is not None and model.features_size == (3, SIZE, SIZE)
    assert model.exported().features is None
    plain = load_model(path)
    plain._fast_backbone = lambda: None  # the PyTorch backbone throughout
    ref = plain.predict(test)
    np.testing.assert_allclose(fast.scores, ref.scores, rtol=1e-4)
    np.testing.assert_allclose(fast.maps[2], ref.maps[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params, message", [
    ({"coreset_ratio": 0.0}, "coreset_ratio: expected a value > 0.0"),
    ({"coreset_ratio": 1.5}, "coreset_ratio: expected a value <= 1.0"),
    ({"neighbourhood": 2}, "neighbourhood: expected an odd number"),
    ({"projection_dim": -1}, "projection_dim: expected a value >= 0"),
    ({"layers": [2, 7]}, "layers: [2, 7] not available for tf_efficientnet_lite0"),
])
def test_bad_parameters_are_named(mvtec_dir, params, message):
    train = [s.path for s in discover(mvtec_dir).train][:2]
    with pytest.raises(InsightADError) as e:
        create_detector("patchcore", image_size=SIZE, **params).fit(train)
    assert message in str(e.value)


def test_cli_train_flags_and_heatmaps(patchcore, mvtec_dir, tmp_path, capsys):
    _, path = patchcore
    assert main(["train", "--method", "patchcore", "--data", str(mvtec_dir), "--coreset", "0",
                 "--out", str(tmp_path / "m.safetensors")]) == 1
    assert "coreset_ratio: expected a value > 0.0" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
    good = sorted((mvtec_dir / "test" / "good").glob("*.png"))[:2]
    bad = sorted((mvtec_dir / "test" / "scratch").glob("*.png"))[:1]
    out = tmp_path / "heat"
    assert main(["predict", "--model", str(path), *map(str, good + bad), "--heatmap", str(out), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all('"heatmap"' in line for line in lines)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(output_names(good + bad, "heatmap")) and len(names) == 3
    img = Image.open(next(out.iterdir()))
    assert img.mode == "RGB" and img.size == (96, 96)  # each heatmap at its image's own size


def test_heatmap_names_never_collide(tmp_path):
    paths = [tmp_path / "good" / "000.png", tmp_path / "crack" / "000.png", tmp_path / "good" / "001.png"]
    assert output_names(paths, "heatmap") == ["000_heatmap.png", "crack_000_heatmap.png", "001_heatmap.png"]


def test_cli_heatmap_refused_for_image_level_models(baseline_model, mvtec_dir, tmp_path, capsys):
    image = next((mvtec_dir / "test" / "good").glob("*.png"))
    assert main(["predict", "--model", str(baseline_model), str(image), "--heatmap", str(tmp_path / "h")]) == 1
    assert "--heatmap: baseline models give no anomaly maps" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_top_fraction_image_score_is_the_mean_of_the_maps_top_and_exports(mvtec_dir, tmp_path):
    """score_top q: the image score is the mean of the map's q highest pixels (0: the paper's re-weighted
    maximum, which model files from before the setting keep), in PyTorch and in the exported graph."""
    assert create_detector("patchcore").score_top == 0.05
    from insightad.inference.export import export_onnx
    from insightad.methods.components.maps import top_mean
    from insightad.methods.patchcore import PatchCoreDetector

    assert PatchCoreDetector.legacy_params["score_top"] == 0.0
    train = [s.path for s in discover(mvtec_dir).train][:8]
    test = [s.path for s in discover(mvtec_dir).test][:4]
    det = create_detector("patchcore", image_size=SIZE, coreset_ratio=0.25, threshold_images=4, score_top=0.05,
                          search="exact", workers=0).fit(train)
    x = np.stack([det.preprocessing_.load(p)[0] for p in test])
    scores, maps = det.forward_tensor(torch.from_numpy(x))
    torch.testing.assert_close(scores, top_mean(maps, 0.05))
    own = create_detector("patchcore", image_size=SIZE, coreset_ratio=0.25, threshold_images=4, score_top=0.0,
                          search="exact", workers=0).fit(train)
    own_scores, own_maps = own.forward_tensor(torch.from_numpy(x))
    torch.testing.assert_close(own_maps, maps)  # the same maps: only the image score differs
    assert not torch.allclose(own_scores, scores)
    export_onnx(det, tmp_path / "pc.onnx", "0" * 64)  # verified against PyTorch within 1e-4 or raises
