"""Training checkpoints in safetensors (no pickle): model, optimiser state, best weights, loop state.

The optimiser's state dict is flattened: its tensors become ``optim/<param>/<key>`` entries and
everything else (hyper-parameters of each group, plain numbers) goes into the JSON metadata.
Files are written atomically, so an interrupted run always leaves the last complete epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from insightad.errors import InsightADError

FORMAT = "insightad-checkpoint"
FORMAT_VERSION = 1
META_KEY = "insightad_checkpoint"
FILE_NAME = "checkpoint.safetensors"


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able rest) of an optimiser state dict."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The optimiser state dict back from :func:`flatten_optimizer`'s output."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    best: dict[str, torch.Tensor] | None, info: dict[str, Any]) -> None:
    """Write model, optimiser, best weights and ``info`` (JSON) atomically to ``path``."""
    from safetensors.torch import save_file

    from insightad.io import atomic_write

    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if best is not None:
        tensors.update({f"best/{k}": v.contiguous() for k, v in best.items()})
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "optimizer": opt_meta, **info}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)}))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None,
                                          dict[str, Any]]:
    """(model state, optimiser state, best weights or None, info) from a checkpoint file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise InsightADError(f"{path}: no checkpoint to resume from (train once without --resume first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged or foreign file
        raise InsightADError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
    if raw is None:
        raise InsightADError(f"{path}: not an InsightAD training checkpoint (no '{META_KEY}' metadata)")
    info = checked_info(path, raw)
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    try:
        optim = unflatten_optimizer(tensors, info.pop("optimizer"))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise InsightADError(f"{path}: damaged checkpoint (its optimiser state cannot be read); train without "
                             "--resume to start over") from None
    return model, optim, best, info


# The loop state a checkpoint's metadata must hold, with the JSON types each entry may have.
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "fingerprint": (dict,), "optimizer": (dict,), "epoch": (int,), "history": (list,),
    "best_loss": (int, float, type(None)), "best_epoch": (int, type(None)), "bad_epochs": (int,),
    "stopped_early": (bool,)}


def checked_info(path: Path, raw: str) -> dict[str, Any]:
    """A checkpoint's metadata, checked: an edited or truncated entry is one line naming the file and the field,
    not a traceback from deep in the resumed run."""
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise InsightADError(f"{path}: damaged checkpoint (its '{META_KEY}' metadata is not a JSON object); train "
                             "without --resume to start over")
    version = info.get("format_version")
    if info.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool) \
            or version > FORMAT_VERSION:
        raise InsightADError(f"{path}: unsupported checkpoint format {info.get('format')!r} version {version!r}")
    for key, kinds in STATE_FIELDS.items():
        value = info.get(key)
        wrong = key not in info or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if wrong or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
            shown = json.dumps(value)[:60] if key in info else "missing"
            raise InsightADError(f"{path}: damaged checkpoint (field {key!r} is {shown}); train without --resume "
                                 "to start over")
    if not all(isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in info["history"]):
        raise InsightADError(f"{path}: damaged checkpoint (field 'history' holds an entry that is not an epoch's "
                             "record); train without --resume to start over")
    return info
