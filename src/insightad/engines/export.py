"""The one export-and-verify routine: a PyTorch module -> an ONNX file that ONNX Runtime has been seen
to reproduce (within ``rtol`` relative, at every batch given) before anyone uses it.

Used for whole models (``insightad export``, ``train``'s graph beside the model file, the inference
cache) and for the fit-time backbone graphs alike. It knows modules and tensors, not Detectors.

A whole model's graph takes the decoded image as it is: uint8 (N, C, H, W) at its own size (any H, W);
``Cast`` and ``Resize`` (``data.resize``'s definition, opset 18) in front of the module bring it to the
module's input, float pixels 0..255 at the model's size. A backbone graph takes those float pixels.

Memory: the graph is written to a file, never held as bytes; its constants are streamed out one tensor
at a time, so the export holds no second copy of a model's tensors. The check builds the file's
session-ready copy from a twin with the constants as external data (ONNX Runtime holds each once there,
twice when it parses them out of the single file: PaDiM's 236 MB factors made that the peak of ``train``).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from insightad.data.resize import RESIZE_ONNX_ATTRIBUTES, resize_array
from insightad.engines.cache import ready_copy
from insightad.engines.checksum import CONTENT_KEY, UNSTAMPED, stamp_content
from insightad.engines.onnx_runtime import META_KEY, ONNX_FORMAT, make_session
from insightad.errors import InsightADError
from insightad.io import TMP_SUFFIX, atomic_write

__all__ = ["META_KEY", "ONNX_FORMAT", "example_batches", "export_verified", "image_examples", "verify"]

OPSET = 18  # Resize with antialias and axes
PARITY_RTOL = 1e-4
EXTERNAL_ALIGN = 4096  # page-aligned constants in an external-data file: ONNX Runtime can map them
MODULE_INPUT = "pixels"  # the module's own input inside a whole-model graph (after Cast and Resize)
Batch = torch.Tensor | np.ndarray


def _same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
               dilation: Sequence[int]) -> list[int]:
    """TensorFlow's 'SAME' padding for an input of ``size`` (h, w), as ``F.pad`` takes it (left, right, top,
    bottom): the extra pixel of an odd total goes after, as TensorFlow puts it."""
    total = [max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
             for i, k, s, d in zip(size, kernel, stride, dilation)]
    (ph, pw) = total
    return [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]


def _padded_conv(conv: nn.Conv2d, pads: list[int], x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.pad(x, pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@contextmanager
def _static_same_padding(module: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Trace timm's TF-'SAME' convolutions with constant padding. They compute their padding from the
    input's shape at run time, which the tracer records as Shape/Ceil/Pad nodes that ONNX Runtime cannot
    fold: the Pad between convolutions (and the layout reorders around it) cost about a third of the
    backbone's time. Inside a graph the module's input always has the model's size, so each padding is
    fixed; traced as a constant, ONNX Runtime fuses it into the Conv. The module is unchanged afterwards."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # no timm: nothing of its kind to trace
        yield
        return
    convs = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    sizes: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:])))
             for m in convs]
    try:
        with torch.inference_mode():
            module(example[:1])
    finally:
        for h in hooks:
            h.remove()
    patched = [m for m in convs if m in sizes]
    for m in patched:
        m.forward = functools.partial(_padded_conv, m,  # type: ignore[method-assign]
                                      _same_pads(sizes[m], m.weight.shape[-2:], m.stride, m.dilation))
    try:
        yield
    finally:
        for m in patched:
            del m.forward


LARGE_CONSTANT = 1 << 22  # elements: tensors this large are kept out of the exporter's shape inference


@contextmanager
def _shape_inference_without_large_constants() -> Iterator[None]:
    """PyTorch's (TorchScript) ONNX exporter hands every parameter and buffer to ONNX shape inference, which
    copies each into a protobuf tensor for the duration: PaDiM's 236 MB of factors once more, the peak of
    ``train`` (+225 MB resident for a moment, measured on bottle). Shape inference needs only their types and
    shapes, which the traced graph's inputs carry, so tensors of ``LARGE_CONSTANT`` elements or more are left
    out of what it is given; the exported graph is the same, byte for byte (checked on PaDiM's). Where this
    PyTorch has no such pass, nothing is changed."""
    name = "_jit_pass_onnx_graph_shape_type_inference"
    original = getattr(torch._C, name, None)
    if original is None:
        yield
        return

    def infer(graph: Any, params: dict[str, torch.Tensor], *rest: Any) -> Any:
        return original(graph, {k: v for k, v in params.items() if v.numel() < LARGE_CONSTANT}, *rest)

    setattr(torch._C, name, infer)
    try:
        yield
    finally:
        setattr(torch._C, name, original)


def _to_onnx(module: nn.Module, example: torch.Tensor, outputs: Sequence[str], path: Path, input_name: str) -> None:
    """The traced graph without its weights: parameters and buffers stay graph inputs named as in the
    module (``_finish`` streams them in from the module's own memory), so the exporter never copies them.
    The module's input has a fixed size (only the batch varies), so TF-'SAME' paddings are traced as constants."""
    dynamic = {input_name: {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with warnings.catch_warnings(), _static_same_padding(module, example), _shape_inference_without_large_constants():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=list(outputs),
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, export_params=False,
                          do_constant_folding=False, keep_initializers_as_inputs=True)


def _resize_front(graph: Any, channels: int, size: tuple[int, int]) -> None:
    """Input ``images`` uint8 (N, C, H, W), any H and W -> float -> Resize to ``size`` -> the module's input.
    uint8 -> float is a DequantizeLinear with scale 1 and zero point 0: exactly a Cast (every level is an
    exact float), but ONNX Runtime's kernel for it is vectorised and threaded, and on a 900 px photo the
    conversion is a quarter of the graph's time as a Cast."""
    from onnx import TensorProto, helper

    old = next(i for i in graph.input if i.name == MODULE_INPUT)
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                        ["batch", channels, "height", "width"]))
    graph.initializer.append(helper.make_tensor("resize_size", TensorProto.INT64, [2], list(size)))
    graph.initializer.append(helper.make_tensor("level_scale", TensorProto.FLOAT, [], [1.0]))
    graph.initializer.append(helper.make_tensor("level_zero", TensorProto.UINT8, [], [0]))
    front = [helper.make_node("DequantizeLinear", ["images", "level_scale", "level_zero"], ["images_float"],
                              name="to_float"),
             helper.make_node("Resize", ["images_float", "", "", "resize_size"], [MODULE_INPUT], name="resize",
                              axes=[2, 3], **RESIZE_ONNX_ATTRIBUTES)]  # type: ignore[arg-type]
    for i, node in enumerate(front):
        graph.node.insert(i, node)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tensor_head(name: str, arr: np.ndarray, **fields: Any) -> Any:
    """A TensorProto naming ``arr`` (its shape and type) without its data, which the caller writes itself."""
    from onnx import TensorProto, helper

    return TensorProto(name=name, dims=list(arr.shape), data_type=helper.np_dtype_to_tensor_dtype(arr.dtype),
                       **fields)


def _bytes_of(arr: np.ndarray) -> memoryview:
    """The array's memory as bytes, in C order, without a copy where it is already contiguous."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")  # type: ignore[arg-type]


def _write_streamed(proto: Any, path: Path, weights: dict[str, np.ndarray]) -> None:
    """Write ``proto`` to ``path``, then each initializer as its own ``graph`` entry (protobuf merges repeated
    entries on reading): the proto's own initializers leave it one at a time, and ``weights`` (name -> array)
    are written straight from the arrays' memory, so no second copy of a large constant is ever made."""
    inits = proto.graph.initializer
    order = [inits.pop() for _ in range(len(inits))]

    def entry(f: Any, parts: list[Any]) -> None:
        body_len = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        graph_entry = b"\x2a" + _varint(body_len)  # GraphProto.initializer: field 5, length-delimited
        f.write(b"\x3a" + _varint(len(graph_entry) + body_len))  # ModelProto.graph: field 7
        f.write(graph_entry)
        for part in parts:
            f.write(part)

    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        while order:
            tensor = order.pop()
            entry(f, [tensor.SerializeToString()])
            del tensor
        for name, arr in weights.items():
            flat = _bytes_of(arr)
            entry(f, [_tensor_head(name, arr).SerializeToString(), b"\x4a" + _varint(flat.nbytes), flat])  # raw_data


def _write_external(proto: Any, path: Path, weights: dict[str, np.ndarray]) -> None:
    """``proto`` with ``weights`` as external data (``path`` plus ``.data``, each tensor at a page-aligned
    offset, written straight from the arrays' memory); ``proto`` itself is left as it was. ONNX Runtime
    loading this form holds each large constant once, where the single-file form costs it twice (the
    parsed protobuf and its own tensor): what ``export_verified`` builds the session-ready copy from."""
    from onnx import TensorProto

    skeleton = type(proto)()
    skeleton.CopyFrom(proto)
    path.parent.mkdir(exist_ok=True)
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for name, arr in weights.items():
            offset = -(-f.tell() // EXTERNAL_ALIGN) * EXTERNAL_ALIGN
            f.write(b"\0" * (offset - f.tell()))
            flat = _bytes_of(arr)
            f.write(flat)
            tensor = _tensor_head(name, arr, data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(flat.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            skeleton.graph.initializer.append(tensor)
    path.write_bytes(skeleton.SerializeToString())


def _module_weights(module: nn.Module, graph: Any, keep: str) -> dict[str, np.ndarray]:
    """The graph inputs that are the module's parameters and buffers (all but ``keep``), as arrays sharing the
    module's memory; they leave the input list (they become initializers)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    weights = {}
    for inp in list(graph.input):
        if inp.name == keep:
            continue
        if inp.name not in named:
            raise InsightADError(f"graph input {inp.name!r} is neither the image input nor a tensor of the module")
        weights[inp.name] = named[inp.name].detach().cpu().contiguous().numpy()
        graph.input.remove(inp)
    return weights


def _drop_empty_pad_values(graph: Any) -> None:
    """PyTorch writes Pad with an empty third input (no constant value: zeros); ONNX Runtime fuses a zero Pad
    into the Conv after it only when that input is absent, so it goes (same meaning, ONNX's default)."""
    for node in graph.node:
        if node.op_type == "Pad" and len(node.input) == 3 and node.input[2] == "":
            del node.input[2]


def _finish(path: Path, module: nn.Module, metadata: dict[str, Any] | None, flat_keys: Sequence[str],
            resize_to: tuple[int, int] | None, channels: int, twin: Path | None = None) -> None:
    """The exported file rewritten with the module's tensors as initializers, the resize front (whole models)
    and our metadata: one JSON entry plus a few plain keys other tools can show. ``twin``: also write the same
    graph there, in a folder of its own, with the module's tensors as external data (``_write_external``)."""
    import onnx

    proto = onnx.load(str(path))
    _drop_empty_pad_values(proto.graph)
    weights = _module_weights(module, proto.graph, "images" if resize_to is None else MODULE_INPUT)
    if resize_to is not None:
        _resize_front(proto.graph, channels, resize_to)
    del proto.metadata_props[:]
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(metadata)
        for key in flat_keys:
            e = proto.metadata_props.add()
            e.key, e.value = key, str(metadata[key])
        e = proto.metadata_props.add()
        e.key, e.value = CONTENT_KEY, UNSTAMPED.decode()  # stamped below, once the file is whole
    if twin is not None:
        try:
            _write_external(proto, twin, weights)
        except OSError:  # no room for it, say: the ready copy is then built from the file itself
            shutil.rmtree(twin.parent, ignore_errors=True)
    _write_streamed(proto, path, weights)
    if metadata is not None:
        stamp_content(path)


def _reference_input(images: Batch, resize_to: tuple[int, int] | None) -> torch.Tensor:
    """What the module itself takes for a batch the graph takes: float pixels at the model's size."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if resize_to is not None:
        arr = np.stack([resize_array(x, resize_to) for x in arr])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _references(module: nn.Module, batches: Sequence[Batch], resize_to: tuple[int, int] | None) -> list[list[np.ndarray]]:
    """The module's outputs on every batch (what the graph must reproduce), as arrays."""
    with torch.inference_mode():
        return [[t.float().numpy() for t in module(_reference_input(images, resize_to))] for images in batches]


def verify(refs: list[list[np.ndarray]], model: str | bytes, batches: Sequence[Batch], what: str,
           rtol: float = PARITY_RTOL, resize_to: tuple[int, int] | None = None) -> None:
    """ONNX Runtime must reproduce every output the module gave on each batch (``refs``, from ``_references``)
    within ``rtol`` (relative to the output's largest magnitude) on every batch; otherwise one line saying which
    output and by how much. With ``resize_to`` the graph gets each batch as it is (uint8, its own size) and the
    module the batch resized by ``data.resize``: the check covers the in-graph resize too. A graph file is
    checked through its ready copy (``engines.cache``), the form every later run opens: what is verified is
    what runs, and the first predict after an export opens at once."""
    sess = make_session(model, threads=None, arena=False, ready=True)  # run once: no arena kept
    names = [o.name for o in sess.get_outputs()]
    feed_name = sess.get_inputs()[0].name
    for images, ref in zip(batches, refs):
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        try:
            got = sess.run(None, {feed_name: np.ascontiguousarray(arr)})
        except Exception as e:  # noqa: BLE001 - e.g. a shape baked in at export
            raise InsightADError(f"{what}: the exported ONNX graph fails on a batch of {len(arr)} images of "
                                 f"{arr.shape[2]}x{arr.shape[3]} ({str(e).splitlines()[0][:160]}); not used") from None
        for name, a, b in zip(names, ref, got):
            scale = max(float(np.abs(a).max()), 1e-12)
            err = float(np.abs(a - b).max()) / scale
            if not np.isfinite(err) or err > rtol:
                raise InsightADError(f"{what}: the exported ONNX graph disagrees with PyTorch on {name} "
                                     f"(relative error {err:.2e} > {rtol:g}); not used")


def release_large_tensors(module: nn.Module) -> int:
    """Empty every parameter and buffer of ``module`` of ``LARGE_CONSTANT`` elements or more, and hand their
    memory back; returns how many bytes were let go. For a module whose graph is written and whose outputs are
    taken: ONNX Runtime's copy of PaDiM's 236 MB factors then never sits beside PyTorch's (the peak of the
    export inside ``train`` and of ``insightad export``). The module is spent afterwards."""
    from insightad.runtime import release_free_memory

    freed = 0
    for m in module.modules():
        for name, param in list(m._parameters.items()):
            if param is not None and param.numel() >= LARGE_CONSTANT:
                freed += param.numel() * param.element_size()
                m._parameters[name] = nn.Parameter(param.detach().new_empty(0), requires_grad=False)
        for name, buf in list(m._buffers.items()):
            if buf is not None and buf.numel() >= LARGE_CONSTANT:
                freed += buf.numel() * buf.element_size()
                m._buffers[name] = buf.new_empty(0)
    if freed:
        release_free_memory()
    return freed


def twin_folder(tmp: Path) -> Path:
    """Where the external-data twin of the graph being written to ``tmp`` (``atomic_write``'s temporary) is
    made: a temporary of the same output, so the next write of that output removes it when a killed run left it
    (it holds a whole copy of the graph's constants)."""
    return tmp.with_name(f"{tmp.name.removesuffix(TMP_SUFFIX)}.twin{TMP_SUFFIX}")


def export_verified(module: nn.Module, batches: Sequence[Batch], outputs: Sequence[str], what: str, out: str | Path,
                    metadata: dict[str, Any] | None = None, flat_keys: Sequence[str] = (), check: bool = True,
                    resize_to: tuple[int, int] | None = None, release: bool = False) -> Path:
    """Write the ONNX graph of ``module`` to ``out`` atomically (input ``images``, a dynamic batch, ``outputs``
    named), metadata attached, verified on every batch in ``batches``. Without ``resize_to`` the graph's
    input is the module's (float pixels, the first batch's shape); with it, uint8 images of any size resized
    in the graph to ``resize_to`` (batches: uint8 at several sizes). Two batch sizes catch a graph that
    baked in the example's batch size; several image sizes, one that baked in the example's size.
    ``release``: the module is spent once its graph is written and its outputs taken (``release_large_tensors``),
    before ONNX Runtime loads the graph to check it."""
    module = module.to("cpu").eval()
    first = np.asarray(batches[0].numpy() if isinstance(batches[0], torch.Tensor) else batches[0])
    example = _reference_input(first, resize_to)

    def write(tmp: Path) -> None:
        twin = twin_folder(tmp) if check else None
        try:
            try:
                _to_onnx(module, example, outputs, tmp, "images" if resize_to is None else MODULE_INPUT)
                _finish(tmp, module, metadata, flat_keys, resize_to, int(first.shape[1]),
                        twin / "graph.onnx" if twin is not None else None)
            except Exception as e:  # noqa: BLE001 - report which part failed, never write a broken file
                raise InsightADError(f"{what}: the graph could not be exported to ONNX "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            if twin is not None:
                refs = _references(module, batches, resize_to)
                if release:
                    release_large_tensors(module)
                if (twin / "graph.onnx").is_file():
                    # The ready copy of the file, built from its external-data twin: the constants once in memory.
                    ready_copy(tmp, source=twin / "graph.onnx")
                verify(refs, str(tmp), batches, what, resize_to=resize_to)
        finally:
            if twin is not None:
                shutil.rmtree(twin, ignore_errors=True)

    out = Path(out)
    atomic_write(out, write)
    return out


def example_batches(shape: Sequence[int], sizes: Sequence[int] = (2, 3), seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random float32 pixel batches (0..255) of (C, H, W) ``shape``, one per batch size."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand((n, *shape), generator=gen) * 255.0 for n in sizes]


def image_examples(channels: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Deterministic uint8 image batches for a whole-model graph: two batch sizes, and sizes other than the
    model's (odd, another aspect ratio, larger and smaller), so the in-graph resize is checked both ways."""
    h, w = size
    rng = np.random.default_rng(seed)
    shapes = [(2, h, w), (3, 2 * h + 3, w + w // 2 + 1), (1, max(h // 2 + 1, 2), max(w - 3, 2))]
    return [rng.integers(0, 256, (n, channels, hh, ww), dtype=np.uint8) for n, hh, ww in shapes]
