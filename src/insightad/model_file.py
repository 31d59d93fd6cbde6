"""One file per trained model: safetensors tensors + JSON metadata. Loading never runs code.

The metadata holds the method and its hyper-parameters, the preprocessing, the backbone and
where its weights came from, the threshold and how it was chosen, the training split and the
package version; the tensors hold everything the model needs, backbone weights included, so a
model file scores images with no network access.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insightad.data.preprocess import Preprocessing
from insightad.errors import InsightADError, cut
from insightad.io import atomic_write, looks_like_onnx, require_file
from insightad.model_schema import FORMAT, FORMAT_VERSION, validate_metadata
from insightad.runtime import resolve_device
from insightad.version import __version__

if TYPE_CHECKING:
    from insightad.methods import Detector

META_KEY = "insightad"
CHECKSUM_KEY = "content_sha256"  # metadata field: sha256 of the rest of the metadata and of every tensor's bytes


def metadata(det: Detector) -> dict[str, Any]:
    """Everything but the tensors."""
    det._check_fitted()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": det.method,
        "params": det.get_params(),
        "preprocessing": det.preprocessing_.to_dict(),
        "backbone": ({"name": det.backbone, "arch": getattr(det, "backbone_arch_", None),
                      "weights_source": getattr(det, "backbone_source_", None),
                      "layers": det.feature_layers()} if det.uses_backbone else None),
        "threshold": {"value": det.threshold_, "strategy": det.threshold_strategy_,
                      "details": getattr(det, "threshold_info_", {})},
        "split": getattr(det, "split_", None),
        "selection": getattr(det, "selection_", None),  # --method auto: the candidates' table
        "training": {"n_images": getattr(det, "n_train_", None), "fit_seconds": getattr(det, "fit_seconds_", None),
                     "fit_engine": getattr(det, "fit_engine_", None)},
        "state": det.state_metadata(),
    }


def save_model(det: Detector, path: str | Path) -> Path:
    """Write the model file atomically, stamped with its content checksum; returns its path."""
    path = Path(path)
    meta = metadata(det)
    if det.model_ is None:
        raise InsightADError(f"{path}: nothing to save: the detector holds no PyTorch model (fit it first)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in det.model_.state_dict().items()}
    _write(path, meta, tensors)
    return path


def _write(path: Path, meta: dict[str, Any], tensors: dict, ready: Callable[[Path], Any] | None = None) -> None:
    """The model file, stamped with its content checksum, written atomically (``ready``: see ``io.atomic_write``)."""
    from safetensors.torch import save_file

    meta = json.loads(json.dumps(meta))  # as a reader will see it (tuples as lists, keys as strings)
    meta[CHECKSUM_KEY] = content_digest(meta, tensors)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)}), ready)


def content_digest(meta: dict[str, Any], tensors: dict) -> str:
    """sha256 of the metadata (its checksum field left out, keys sorted) and of every tensor's name, dtype,
    shape and bytes: a flipped bit anywhere a reader looks changes it (the file's own sha256 would change with
    an equivalent re-serialisation, and names the file for caches, not its content)."""
    import torch

    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the bytes in place: no copy of the factors
    return h.hexdigest()


def _check_content(path: Path, meta: dict[str, Any], tensors: dict) -> None:
    """A file that carries a checksum must match it (files written before checksums carry none)."""
    stored = meta.get(CHECKSUM_KEY)
    if stored is not None and stored != content_digest(meta, tensors):
        raise InsightADError(f"{path}: the model file's content does not match its checksum (damaged or edited "
                             "after it was written); train it again or restore a copy")


def read_metadata(path: str | Path, check_params: bool | None = None) -> dict[str, Any]:
    """The JSON metadata of a model file, checked, without loading tensors. ``check_params`` (default: where
    PyTorch is installed) also checks the method's hyper-parameters, which imports the methods."""
    from safetensors import safe_open

    path = require_file(path, "model file")
    if path.stat().st_size == 0:
        raise InsightADError(f"{path}: model file is empty")
    try:
        with safe_open(str(path), framework="numpy") as f:  # metadata only: no PyTorch needed
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or foreign file
        if looks_like_onnx(path):
            raise InsightADError(f"{path}: an ONNX graph, not a model file (safetensors); InsightAD reads a graph "
                                 "from a .onnx name: rename it") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InsightADError(f"{path}: not a valid InsightAD model file (corrupt, truncated or another format: "
                             f"{reason})") from None
    if raw is None:
        raise InsightADError(f"{path}: a safetensors file but not an InsightAD model (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise InsightADError(f"{path}: model metadata is not valid JSON (file damaged?)") from None
    except RecursionError:
        raise InsightADError(f"{path}: model metadata is nested too deeply; refusing it") from None
    if check_params is None:
        from insightad.runtime import torch_available

        check_params = torch_available()
    meta = validate_metadata(meta, str(path), check_params)
    return with_legacy_params(meta) if check_params else meta


def with_legacy_params(meta: dict[str, Any]) -> dict[str, Any]:
    """A file written before a setting existed was fitted with that setting's old behaviour: fill the
    method's ``legacy_params`` in where the file has no value, so it scores as it did (a new default
    never changes an old model). Needs the methods (PyTorch): a graph made from the file needs none."""
    from insightad.methods import get_method

    legacy = getattr(get_method(meta["method"]), "legacy_params", {})
    if legacy:
        meta = {**meta, "params": {**legacy, **meta["params"]}}
    return meta


def load_model(path: str | Path, device: str = "cpu") -> Detector:
    """A fitted detector from a model file: no pickle, no network."""
    from safetensors.torch import load_file

    from insightad.methods import get_method, tiling

    path = Path(path)
    meta = read_metadata(path, check_params=True)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise InsightADError(f"{path}: cannot read the model's tensors ({str(e).splitlines()[0]})") from None
    _check_finite(path, tensors)
    cls = get_method(meta["method"])
    try:
        det = cls.from_params({**meta["params"], "device": device})
    except InsightADError as e:
        raise InsightADError(f"{path}: model metadata field 'params': {cut(str(e), 300)}") from None
    try:
        det.preprocessing_ = Preprocessing.from_dict(meta["preprocessing"])
    except InsightADError as e:
        raise InsightADError(f"{path}: model metadata field 'preprocessing': {e}") from None
    det.device_ = resolve_device(device)
    bb = meta.get("backbone") or {}
    det.backbone_arch_, det.backbone_source_ = bb.get("arch"), bb.get("weights_source")
    try:
        model = tiling.wrap(det, det._restore(tiling.inner_tensors(tensors), meta.get("state") or {}))
        model.load_state_dict(tensors, strict=True)
    except InsightADError as e:
        raise InsightADError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise InsightADError(f"{path}: the tensors do not fit a {meta['method']} model "
                             f"({str(e).splitlines()[0][:200]})") from None
    # Last: a file whose structure is wrong gets the more specific message above.
    _check_content(path, read_metadata(path, check_params=False), tensors)  # as stored, before legacy params
    det.model_ = model.to(det.device_).eval()
    thr = meta["threshold"]
    det.set_threshold(thr["value"], thr["strategy"], **(thr.get("details") or {}))
    det.split_ = meta.get("split")
    if meta.get("selection"):
        det.selection_ = meta["selection"]
    det.n_train_ = (meta.get("training") or {}).get("n_images")
    det.model_path_ = str(path)
    det.metadata_ = meta
    return det


def _check_finite(path: Path, tensors: dict) -> None:
    """NaN or infinity in any stored tensor means a damaged file, even in a tensor this scorer does not read."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InsightADError(f"{path}: tensor {name!r} holds NaN or infinity; the model file is damaged (train it again)")


def update_metadata(path: str | Path, *, ready: Callable[[Path], Any] | None = None, **changes: Any) -> None:
    """Rewrite a model file atomically with some metadata fields replaced (e.g. the threshold); a damaged file
    is refused, not stamped with a fresh checksum. ``ready``: called on the new file before it replaces the old
    one (``io.atomic_write``)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path, check_params=False)  # as stored: the checksum covers exactly that
    tensors = load_file(str(path))
    _check_content(path, meta, tensors)
    meta.update(changes)
    _write(path, meta, tensors, ready)
