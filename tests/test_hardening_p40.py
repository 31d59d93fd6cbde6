"""Consistency sweep: the same image gets the same score whichever command and engine asks, odd images included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from insightad.inference.load import load_for_inference


def _half_white(mvtec_dir, size=(640, 480)) -> np.ndarray:
    """A good test image at a camera's size with its top half blown out to white (a saturated, flat area)."""
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    arr = np.asarray(Image.open(image).convert("RGB").resize(size)).copy()
    arr[: size[1] // 2] = 255
    return arr


def test_p40_rounding_in_a_flat_area_does_not_move_the_score(baseline_model, mvtec_dir):
    """A white area resized by another implementation is 254.9997 here and there instead of 255: the score
    must not notice (the spread of a flat region was L2-normalised into a unit vector of rounding noise)."""
    det = load_for_inference(baseline_model, "torch")
    x, _ = det.load_input(_half_white(mvtec_dir))
    assert np.any(x == 255.0)
    rounded = x.copy()
    rounded[:, ::3, ::2] = np.where(rounded[:, ::3, ::2] == 255.0, np.float32(254.9997), rounded[:, ::3, ::2])
    exact, noisy = det.forward_batch(np.stack([x, rounded]))[0]
    assert noisy == pytest.approx(exact, rel=1e-5)


def test_p40_a_half_saturated_photo_scores_the_same_on_both_engines(baseline_model, mvtec_dir, tmp_path):
    """PyTorch (Python resize) and ONNX Runtime (the graph's resize) agree within 1e-4 on an overexposed photo
    and on a one-pixel image (they differed by 2-3%)."""
    photo = tmp_path / "overexposed.png"
    Image.fromarray(_half_white(mvtec_dir)).save(photo)
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (123, 64, 65)).save(dot)
    torch_scores = load_for_inference(baseline_model, "torch").predict([photo, dot], maps=False).scores
    onnx_scores = load_for_inference(baseline_model, "onnx").predict([photo, dot], maps=False).scores
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4)


@pytest.mark.parametrize("command", ["sort", "batch", "predict"])
def test_p40_files_passed_over_by_their_names_are_said(command, baseline_model, mvtec_dir, tmp_path, capsys):
    """A WebP or GIF photo in the input folder is not scored (README: refused with a message naming the file):
    sort and batch left it behind without a word, predict said so; now all three say it in the same line."""
    from insightad.cli import main

    folder = tmp_path / "incoming"
    folder.mkdir()
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    Image.open(image).convert("RGB").save(folder / "part.png")
    Image.open(image).convert("RGB").save(folder / "photo.webp")
    Image.open(image).convert("RGB").save(folder / "photo.gif")
    out = tmp_path / "out"
    args = {"sort": ["--input", str(folder), "--out", str(out)],
            "batch": ["--input", str(folder), "--out", str(tmp_path / "r.parquet")],
            "predict": [str(folder)]}[command]
    assert main([command, "--model", str(baseline_model), "--engine", "torch", *args]) == 0
    err = capsys.readouterr().err
    assert "2 files not scored, taken for masks or non-images by their names" in err
    assert "e.g. photo.gif" in err
    if command == "sort":
        assert (folder / "photo.webp").exists() and "left where they are" in err


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_p40_an_animated_png_is_refused_as_a_multi_page_tiff_is(engine, baseline_model, mvtec_dir, tmp_path, capsys):
    """An animated PNG was scored on its first frame (Pillow on PyTorch, libspng on ONNX Runtime), its other
    frames passed unseen, where a TIFF of several pages is refused; a one-frame PNG still scores."""
    from insightad.cli import main

    first = Image.open(sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]).convert("RGB")
    anim, still = tmp_path / "anim.png", tmp_path / "still.png"
    first.save(anim, save_all=True, append_images=[first.rotate(90)])
    first.save(still, save_all=True)
    assert main(["predict", "--model", str(baseline_model), "--engine", engine, "--json", str(anim), str(still)]) == 1
    out, err = capsys.readouterr()
    assert "anim.png: an animated PNG with 2 frames; expected a single image (save each frame as its own file)" in err
    assert '"error": null' in out.splitlines()[1]


def test_p40_a_dataset_folder_says_which_images_it_cannot_use(baseline_model, mvtec_dir, tmp_path, capsys):
    """evaluate (and train, calibrate: the same dataset walk) passed over a WebP photo in silence; notes and
    model files in the folder are not images and stay unmentioned."""
    from insightad.cli import main

    folder = tmp_path / "new_parts"
    folder.mkdir()
    for i, image in enumerate(sorted((mvtec_dir / "test" / "good").glob("*.png"))[:3]):
        Image.open(image).convert("RGB").save(folder / f"{i}.png")
    Image.open(image).convert("RGB").save(folder / "photo.webp")
    (folder / "notes.txt").write_text("shift 2")
    assert main(["evaluate", "--model", str(baseline_model), "--engine", "torch", "--data", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "1 files not used, taken for masks or non-images by their names" in err
    assert "e.g. photo.webp; convert them to PNG to use them" in err


class _TileScorer(torch.nn.Module):
    """A stand-in method model: per tile, its mean level (score) and its channel mean (map)."""

    def forward(self, x):
        return x.float().mean((1, 2, 3)), x.float().mean(1)


def test_p40_a_tiled_graph_scores_every_tile_of_a_large_batch(tmp_path):
    """The tiled model's loop over 16 tiles at a time was traced into the graph with the example batch's slices:
    a batch of more tiles lost its last ones (8 images of 2 x 2 tiles: wrong scores, no error) or failed in a
    Reshape (5 images): predict, sort, batch and serve on ONNX Runtime. The graph now takes every tile at once."""
    from insightad.engines.export import export_verified
    from insightad.engines.onnx_runtime import make_session
    from insightad.methods.tiling import TILE_BATCH, TiledModel

    model = TiledModel(_TileScorer(), tile_size=8, tiles=2, overlap=0.25).eval()
    rng = np.random.default_rng(0)
    example = [torch.from_numpy(rng.random((n, 3, model.size, model.size), dtype=np.float32) * 255) for n in (2, 3)]
    graph = export_verified(model, example, ["scores", "maps"], "tiled test model", tmp_path / "tiled.onnx")
    session = make_session(str(graph))
    for n in (5, 8, 9):  # 20, 32 and 36 tiles: more than TILE_BATCH
        assert n * 4 > TILE_BATCH
        x = torch.from_numpy(rng.random((n, 3, model.size, model.size), dtype=np.float32) * 255)
        want = [t.numpy() for t in model(x)]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-3)


def test_p40_a_tiled_graph_gets_about_16_tiles_a_call():
    """An ONNX scorer of a tiled model file is given at most ``config.images_per_run`` images a call (set by
    inference.load from the model file's tile setting): memory bounded as on PyTorch, and a graph exported before
    the fix above (its traced slices cover at least 16 tiles) scores every tile of what it is given."""
    from insightad.config import images_per_run
    from insightad.scoring import Scorer

    assert [images_per_run(t) for t in (1, 2, 3, 4, 5)] == [None, 4, 1, 1, 1]
    calls: list[int] = []

    def engine(x):
        calls.append(len(x))
        return (x.reshape(len(x), -1).mean(1),)

    scorer = Scorer()
    scorer.engine_, scorer.images_per_run_ = engine, 2
    images = [np.full((3, 8, 8), i, np.float32) for i in range(5)]
    scores, _ = scorer.forward_images(images)
    assert calls == [2, 2, 1] and scores.tolist() == [0, 1, 2, 3, 4]
    calls.clear()
    scorer.forward_images(images, max_batch=1)
    assert calls == [1] * 5


def test_p40_the_page_shows_a_photo_as_it_was_scored(tmp_path):
    """A JPEG whose EXIF says "rotate 90" is scored in the order its pixels are stored (the decode contract), and
    its heatmap too; the operators' page showed the photo turned by the browser under an unturned heatmap."""
    import shutil
    import subprocess

    from insightad.apps.serve.page import STATIC

    css = (STATIC / "style.css").read_text()
    assert "img { image-orientation: none; }" in css
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium to render the page's stylesheet")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 60), (90, 120, 150)).save(tmp_path / "tagged.jpg", exif=exif)
    (tmp_path / "style.css").write_text(css)
    (tmp_path / "page.html").write_text(
        '<html><head><link rel="stylesheet" href="style.css"></head><body><img id="a" src="tagged.jpg"><script>'
        "window.onload = () => { const r = document.getElementById('a').getBoundingClientRect();"
        "document.body.setAttribute('data-size', r.width + 'x' + r.height); };</script></body></html>")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=3000", "--dump-dom", (tmp_path / "page.html").as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    assert 'data-size="120x60"' in dom


def test_p40_a_graph_file_says_how_it_is_tiled(baseline_model, tmp_path):
    """The .onnx given alone to --model knows its tiles per side from its metadata (1 here: no cap)."""
    from insightad.cli import main
    from insightad.inference.onnx_detector import OnnxDetector

    graph = tmp_path / "m.onnx"
    assert main(["export", "--model", str(baseline_model), "--out", str(graph)]) == 0
    det = OnnxDetector.from_file(graph)
    assert det.onnx_meta_["tiles"] == 1 and det.images_per_run_ is None
