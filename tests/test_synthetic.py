"""The synthetic defect generator: deterministic, exact masks, defects on the product, dataset layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from insightad.data.synthetic import DEFECTS, KINDS, OBJECT_KINDS, TOLERANCE, make_image, object_mask, write_dataset
from insightad.errors import InsightADError


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_names():
    assert KINDS == ("grid", "stripes", "weave", "disc", "plate", "arrow")
    assert DEFECTS == ("scratch", "blob", "crack", "missing")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("defect", (None,) + DEFECTS)
def test_same_seed_same_bytes(kind, defect):
    a, ma = make_image(kind, defect, seed=7)
    b, mb = make_image(kind, defect, seed=7)
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(ma, mb)


@pytest.mark.parametrize("kind", KINDS)
def test_different_seed_different_image(kind):
    images = [make_image(kind, seed=s)[0].tobytes() for s in range(4)]
    assert len(set(images)) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_normal_images_vary_a_little(kind):
    """Normal images differ from each other, but stay the same product (similar mean colour)."""
    arrays = [_arr(make_image(kind, seed=s)[0]).astype(float) for s in range(6)]
    means = np.array([a.reshape(-1, 3).mean(0) for a in arrays])
    assert np.abs(means - means.mean(0)).max() < 20
    assert all(np.abs(arrays[0] - a).mean() > 1 for a in arrays[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_normal_has_empty_mask(kind):
    img, mask = make_image(kind, seed=3)
    assert img.mode == "RGB" and img.size == (128, 128)
    assert mask.dtype == bool and mask.shape == (128, 128) and not mask.any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_is_exactly_the_changed_pixels(kind, defect):
    for seed in range(4):
        normal, _ = make_image(kind, None, seed=seed)
        bad, mask = make_image(kind, defect, seed=seed)
        assert mask.dtype == bool and mask.shape == (128, 128)
        assert mask.sum() >= 20, (kind, defect, seed)
        changed = (np.abs(_arr(bad) - _arr(normal)) > TOLERANCE).any(-1)
        assert np.array_equal(mask, changed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_grayscale(kind, defect):
    normal, _ = make_image(kind, None, seed=5, grayscale=True)
    bad, mask = make_image(kind, defect, seed=5, grayscale=True)
    assert normal.mode == "L" and bad.mode == "L" and bad.size == (128, 128)
    assert mask.any()
    assert np.array_equal(mask, np.abs(_arr(bad) - _arr(normal)) > TOLERANCE)


@pytest.mark.parametrize("kind", OBJECT_KINDS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_defects_lie_on_the_object(kind, defect):
    inside = total = 0
    for seed in range(6):
        _, mask = make_image(kind, defect, seed=seed)
        product = object_mask(kind, seed=seed)
        assert 0.05 < product.mean() < 0.8  # an object on a background, not a texture
        assert (mask & product).sum() >= 0.75 * mask.sum(), (kind, defect, seed)
        inside += (mask & product).sum()
        total += mask.sum()
    assert inside >= 0.9 * total


def test_textures_cover_the_whole_image():
    for kind in ("grid", "stripes", "weave"):
        assert object_mask(kind, seed=1).all()


def test_defect_is_visible():
    """The changed pixels change a lot (not just past the tolerance) somewhere."""
    for kind in KINDS:
        for defect in DEFECTS:
            normal, _ = make_image(kind, None, seed=2)
            bad, mask = make_image(kind, defect, seed=2)
            assert np.abs(_arr(bad) - _arr(normal)).max() >= 50, (kind, defect)


def test_other_sizes():
    for size in (32, 200):
        img, mask = make_image("plate", "crack", size=size, seed=1)
        assert img.size == (size, size) and mask.shape == (size, size) and mask.any()


@pytest.mark.parametrize("call", [
    lambda: make_image("banana"),
    lambda: make_image("disc", "dent"),
    lambda: make_image(kind=3),
    lambda: make_image("disc", size=8),
    lambda: make_image("disc", seed=-1),
    lambda: write_dataset("unused", layout="coco"),
    lambda: write_dataset("unused", image_format="gif"),
    lambda: write_dataset("unused", defects=("scratch", "dent")),
    lambda: write_dataset("unused", n_train=-1),
])
def test_bad_arguments_raise(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InsightADError) as err:
        call()
    assert "\n" not in str(err.value)


def test_error_lists_valid_names():
    with pytest.raises(InsightADError, match="grid, stripes, weave, disc, plate, arrow"):
        make_image("banana")
    with pytest.raises(InsightADError, match="scratch, blob, crack, missing"):
        make_image("disc", "dent")


def _files(root, pattern):
    return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())


def _check_mask(mask_path, image_path):
    mask = Image.open(mask_path)
    assert mask.mode == "L" and mask.size == Image.open(image_path).size
    values = set(np.unique(np.asarray(mask)).tolist())
    assert values <= {0, 255} and 255 in values


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp", "tiff"])
def test_write_mvtec(tmp_path, fmt):
    root = write_dataset(tmp_path / "ds", layout="mvtec", n_train=3, n_test_good=2, n_per_defect=2,
                         defects=("scratch", "missing"), size=64, image_format=fmt)
    assert root == tmp_path / "ds"
    assert _files(root, "train/good/*") == [f"train/good/{i:03d}.{fmt}" for i in range(3)]
    assert _files(root, "test/good/*") == [f"test/good/{i:03d}.{fmt}" for i in range(2)]
    for d in ("scratch", "missing"):
        assert _files(root, f"test/{d}/*") == [f"test/{d}/{i:03d}.{fmt}" for i in range(2)]
        assert _files(root, f"ground_truth/{d}/*") == [f"ground_truth/{d}/{i:03d}_mask.png" for i in range(2)]
        for i in range(2):
            _check_mask(root / f"ground_truth/{d}/{i:03d}_mask.png", root / f"test/{d}/{i:03d}.{fmt}")
    assert not (root / "test" / "blob").exists()
    img = Image.open(root / f"train/good/000.{fmt}")
    assert img.mode == "RGB" and img.size == (64, 64)


def test_write_mvtec_images_all_differ(tmp_path):
    root = write_dataset(tmp_path, n_train=4, n_test_good=3, n_per_defect=2, size=48)
    images = [p.read_bytes() for p in root.rglob("*.png") if "ground_truth" not in p.parts]
    assert len(images) == 4 + 3 + 2 * len(DEFECTS)
    assert len({Image.open(p).tobytes() for p in root.rglob("*.png") if "ground_truth" not in p.parts}) == len(images)


def test_write_is_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", kind="weave", n_train=2, n_test_good=1, n_per_defect=1, size=48, seed=3)
    b = write_dataset(tmp_path / "b", kind="weave", n_train=2, n_test_good=1, n_per_defect=1, size=48, seed=3)
    c = write_dataset(tmp_path / "c", kind="weave", n_train=2, n_test_good=1, n_per_defect=1, size=48, seed=4)
    files = _files(a, "**/*")
    assert files == _files(b, "**/*") == _files(c, "**/*")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train/good/000.png").read_bytes() != (c / "train/good/000.png").read_bytes()


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_write_folder(tmp_path, fmt):
    root = write_dataset(tmp_path, kind="grid", layout="folder", n_train=3, n_test_good=2, n_per_defect=2,
                         defects=("blob", "crack"), size=64, image_format=fmt, grayscale=True)
    assert _files(root, "normal/*") == [f"normal/{i:03d}.{fmt}" for i in range(5)]
    for d in ("blob", "crack"):
        assert _files(root, f"abnormal/{d}/*") == [f"abnormal/{d}/{i:03d}.{fmt}" for i in range(2)]
        for i in range(2):
            _check_mask(root / f"masks/{d}/{i:03d}_mask.png", root / f"abnormal/{d}/{i:03d}.{fmt}")
    assert Image.open(root / f"normal/000.{fmt}").mode == "L"


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp", "tiff"])
def test_write_crack(tmp_path, fmt):
    root = write_dataset(tmp_path, kind="stripes", layout="crack", n_train=2, n_test_good=1, n_per_defect=2,
                         defects=("crack",), size=48, image_format=fmt)
    assert _files(root, "Negative/*") == [f"Negative/{i:03d}.{fmt}" for i in range(3)]
    assert _files(root, "Positive/*") == [f"Positive/crack_{i:03d}.{fmt}" for i in range(2)]
    assert _files(root, "**/*_mask*") == []
