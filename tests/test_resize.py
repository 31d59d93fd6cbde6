"""Issue 14: one resize definition (float antialiased bilinear) for Python and the ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest

from insightad.data.preprocess import Preprocessing
from insightad.data.resize import RESIZE_ONNX_ATTRIBUTES, resize_array, resize_reference, resize_weights
from insightad.errors import InsightADError

# (H, W) -> (h, w): odd sizes, other aspect ratios, up- and downsampling, one axis each way, identity.
CASES = [((7, 9), (5, 4)), ((37, 53), (16, 16)), ((10, 10), (23, 17)), ((100, 61), (32, 32)),
         ((33, 20), (20, 33)), ((5, 5), (5, 5)), ((1, 7), (3, 3)), ((257, 255), (64, 64))]


def _onnx_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("Resize", ["x", "", "", "s"], ["y"], axes=[2, 3], **RESIZE_ONNX_ATTRIBUTES)
    graph = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                                helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x[None].astype(np.float32), "s": np.array(size, np.int64)})[0][0]


def test_weights_are_the_definition():
    w = resize_weights(6, 3)  # downsampling by 2: triangle of half-width 2 around centres 1, 3, 5
    np.testing.assert_allclose(w[1], [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0])
    np.testing.assert_allclose(w[0], [3 / 7, 3 / 7, 1 / 7, 0, 0, 0])  # the edge: only pixels inside count
    np.testing.assert_allclose(resize_weights(2, 4)[1], [0.75, 0.25])  # upsampling: plain bilinear
    np.testing.assert_allclose(resize_weights(9, 9), np.eye(9))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("src,dst", CASES)
def test_python_and_onnx_resize_match_the_definition(src, dst, channels):
    x = np.random.default_rng(sum(src) + channels).integers(0, 256, (channels, *src)).astype(np.uint8)
    ref = resize_reference(x, dst)
    py = resize_array(x, dst)
    assert py.dtype == np.float32 and py.shape == (channels, *dst)
    assert float(np.abs(py - ref).max()) < 1e-4 * 255
    assert float(np.abs(_onnx_resize(x, dst) - ref).max()) < 1e-4 * 255
    # The Preprocessing path (decode from a Pillow image) gives the same floats.
    img = x[0] if channels == 1 else x.transpose(1, 2, 0)
    got, size = Preprocessing(size=dst, channels=channels).load(img)
    assert size == src and float(np.abs(got - ref).max()) < 1e-4 * 255


def test_retired_filters_are_refused_in_one_line():
    with pytest.raises(InsightADError, match="'bicubic' filter is no longer supported.*retrain"):
        Preprocessing(resize="bicubic")


def test_float_arrays_keep_their_values():
    """Images already resized (float, e.g. synthetic-defect validation) score as their files do."""
    x = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    got, size = Preprocessing(size=(16, 16)).load(x)
    np.testing.assert_array_equal(got, x.transpose(2, 0, 1))
    assert Preprocessing(size=(8, 8)).decode(x).dtype == np.uint8


class _Pixels:
    """A module whose map output is the pixels it gets (channel 0): the graph's resize made visible."""

    @staticmethod
    def make():
        import torch

        class M(torch.nn.Module):
            def forward(self, x):
                return x.mean((1, 2, 3)), x[:, 0]

        return M()


@pytest.mark.parametrize("channels", [1, 3])
def test_in_graph_resize_matches_the_python_path(tmp_path, channels):
    """The exported graph takes uint8 at any size and resizes inside: odd sizes and aspect ratios, both ways."""
    import onnxruntime as ort

    from insightad.engines.export import export_verified, image_examples

    size = (24, 40)
    out = export_verified(_Pixels.make(), image_examples(channels, size), ["scores", "maps"], "pixels",
                          tmp_path / "p.onnx", resize_to=size)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    prep = Preprocessing(size=size, channels=channels)
    for src, _ in CASES + [((24, 40), None), ((401, 97), None)]:
        x = np.random.default_rng(src[0]).integers(0, 256, (2, channels, *src)).astype(np.uint8)
        got = sess.run(None, {"images": x})[1]
        want = np.stack([prep.resize_array(a)[0] for a in x])
        assert got.shape == (2, *size)
        assert float(np.abs(got - want).max()) < 1e-4 * 255, src
