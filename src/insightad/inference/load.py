"""Load a model for inference on the chosen engine: one entry point for predict, evaluate, sort, serve, batch.

An ONNX export, or a model file whose graph is stored beside it (``<model>.onnx``) or in the cache,
scores on ONNX Runtime without importing PyTorch; only a model file with no graph (or ``--engine
torch``) needs PyTorch, and a runtime-only install says so in one line.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insightad.config import images_per_run
from insightad.engines.onnx_runtime import is_onnx_file
from insightad.errors import InsightADError
from insightad.runtime import ENGINES, TRAIN_EXTRA, check_device, on_gpu, onnx_available, resolve_engine, torch_available
from insightad.scoring import Scorer

if TYPE_CHECKING:
    from insightad.inference.onnx_detector import OnnxDetector

TORCH_FIRST = frozenset({"patchcore"})  # methods whose Detector says onnx_auto = False (checked by a test)


def load_for_inference(path: str | Path, engine: str = "auto", threads: int | None = None,
                       device: str = "cpu", arena: bool = True) -> Scorer:
    """A model file (or an InsightAD ONNX export) ready to predict on ``engine``.

    ``auto`` picks ONNX Runtime on CPU when installed: the graph stored for the model file when there is
    one (no PyTorch), else exported once per model file and cached; PyTorch on a GPU, and for a method that
    declares its PyTorch graph the better default (``onnx_auto = False``) when PyTorch is installed.
    ``arena``: ONNX Runtime's memory arena (off in the server: less resident memory).
    """
    if engine not in ENGINES:
        raise InsightADError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    check_device(device)  # every engine refuses the same spellings, whether it uses the device or not
    if is_onnx_file(path):
        if engine == "torch":
            raise InsightADError(f"{path}: an ONNX file runs on the onnx engine only (drop --engine torch)")
        from insightad.inference.onnx_detector import OnnxDetector

        onnx_det = OnnxDetector.from_file(path, threads, arena=arena)
        warm_up(onnx_det, path)
        return onnx_det
    from insightad.model_file import read_metadata

    meta = read_metadata(path, check_params=False)  # load_model checks them where PyTorch scores
    if _graph_first(engine, device, meta["method"]):
        graph = stored_graph(path, meta, threads, arena)
        if graph is not None:
            warm_up(graph, path)
            return graph
    if not torch_available():
        if engine == "torch":
            raise InsightADError(f"{path}: --engine torch needs PyTorch, which this install does not have: {TRAIN_EXTRA}")
        from insightad.inference.export import beside

        raise InsightADError(f"{path}: no ONNX graph of this model file (looked for {beside(path)} and the "
                             f"cache), and PyTorch is not installed to make one: run 'insightad export --model "
                             f"{path}' where PyTorch is installed ({TRAIN_EXTRA}) and put the .onnx beside the "
                             "model file (or score with the .onnx itself)")
    return _load_torch(path, engine, threads, device, arena)


def _graph_first(engine: str, device: str, method: str) -> bool:
    """Whether to look for a stored graph before loading PyTorch at all."""
    if engine == "onnx":
        return True
    if engine == "torch" or not onnx_available():
        return False
    if not torch_available():
        return True
    return method not in TORCH_FIRST and not on_gpu(device)


def stored_graph(path: str | Path, meta: dict[str, Any], threads: int | None = None, arena: bool = True
                 ) -> OnnxDetector | None:
    """The graph made from exactly this model file (stamped with its sha256), beside it or in the cache, as a
    scorer that needs no PyTorch; None when there is none. A stale or swapped graph is never used."""
    from insightad.inference.export import stored_engine
    from insightad.inference.onnx_detector import OnnxDetector

    engine = stored_engine(path, threads, arena=arena)
    if engine is None:
        return None
    det = OnnxDetector.from_file(path, threads, engine=engine)
    det.model_path_ = str(path)
    det.metadata_ = meta
    det.split_ = meta.get("split")
    det.images_per_run_ = images_per_run((meta.get("params") or {}).get("tile", 1))
    return det


def _load_torch(path: str | Path, engine: str, threads: int | None, device: str, arena: bool = True) -> Scorer:
    """The PyTorch model of a model file, on ONNX Runtime through an exported (cached) graph when chosen."""
    import torch

    from insightad.model_file import load_model

    if threads:
        torch.set_num_threads(int(threads))
    det = load_model(path, device=device)
    warm_up(det, path)  # on PyTorch first: a model that cannot score is refused before any export
    chosen = resolve_engine(engine, device)
    if engine == "auto" and not det.onnx_auto:
        chosen = "torch"
    det.engine_name_ = "torch"
    if chosen == "onnx":
        from insightad.inference.export import cached_engine

        try:
            det.engine_ = cached_engine(det, path, threads, arena)
            det.engine_name_ = "onnx"
            det.images_per_run_ = images_per_run(getattr(det, "tile", 1))
        except InsightADError as e:
            if engine == "onnx":
                raise InsightADError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a graph that cannot be traced: tensors that do not fit
            if engine == "onnx":
                raise InsightADError(f"{path}: cannot export the model to ONNX ({_first_line(e)})") from None
        else:  # the session holds the weights now: a second copy in PyTorch would only cost memory
            det.model_ = None
            gc.collect()
            warm_up(det, path)  # the graph now answers: check it too (PyTorch was checked above)
    return det


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def warm_up(det: Scorer, path: str | Path) -> None:
    """Score one generated image at the model's size: a model whose tensors do not fit its metadata,
    or that scores NaN or infinity (NaN in its tensors, a zero std), is refused here, at load."""
    p = det.preprocessing_
    x = np.random.default_rng(0).integers(0, 256, (1, p.channels, *p.size), dtype=np.uint8)
    try:
        scores, maps = det.forward_batch(x if det.decoded_input else x.astype(np.float32))
    except InsightADError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the model file's, said in one line
        raise InsightADError(f"{path}: the model cannot score an image (its tensors do not fit its "
                             f"metadata: {_first_line(e)})") from None
    if not bool(np.isfinite(scores).all()) or (maps is not None and not bool(np.isfinite(maps).all())):
        raise InsightADError(f"{path}: the model scores NaN or infinity on its warm-up image (NaN or inf in "
                             "its tensors?); refusing it")
    det.warmed_up_ = True  # the engine has run once: a server need not warm it up again
