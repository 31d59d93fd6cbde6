"""Ensemble: several methods fitted on the same normal images, each score put on its own normal spread,
the results averaged.

Each member is fitted with its defaults (and the shared backbone, size and seed), then validated out of
fold exactly as ``train`` validates a single method (``methods.crossfit``): its threshold t and the spread
s of its out-of-fold normal scores (``score_normalized``'s scale) are what a score of that member means.
The ensemble scores z = mean over members of (score - t) / s, and its maps the same mean over the members
that have maps (model size). Methods that fail differently (PaDiM's per-position Gaussians on the
patches, SVDD's head trained on the pooled image) disagree on different normal images, so their mean
ranks better than either alone; the cost is the sum of the members' (fit, predict, model size).

The ensemble's own validation reuses the members': the same folds and seed give every member the same
validation normals and the same synthetic defects, so their out-of-fold scores combine image by image
(``crossfit`` scheme ``members``). The same combined scores weigh the members (``weighting``): the mean is
weighted by what separates those normals from the synthetic defects best, so a member that ranks a set
worse than the others does not pull the ensemble down with an equal share.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from insightad.config import REFIT_FOLDS, REFIT_FOLDS_HELP, DetectorParams, param, params
from insightad.errors import InsightADError
from insightad.methods.base import Detector
from insightad.methods.crossfit import DEFAULT_FOLDS, OutOfFold, validate_and_decide
from insightad.methods.registry import get_method, list_methods, register_method
from insightad.methods.tiling import is_tiled

SHARED = tuple(DetectorParams.__dataclass_fields__)  # what every member takes from the ensemble
WEIGHT_STEP = 0.1  # member weights searched on validation: multiples of this, each at least one step
WEIGHT_TIE = 0.005  # validation AUROCs this close to the best count as equal: the weights nearest equal win


@params
class EnsembleParams(DetectorParams):
    """Several methods side by side: each score on its own normal spread, averaged."""

    members: list[str] = param(["padim", "svdd"], "methods fitted side by side (each with its defaults and "
                               "this backbone, size and seed); their standardised scores are averaged")
    weighting: str = param("validation", "validation: the mean is weighted (in steps of 0.1, each member at least "
                           "0.1) by what best separates the members' out-of-fold normals from their synthetic "
                           "defects, the weights nearest equal among those within 0.005 AUROC of the best; "
                           "equal: the plain mean", choices=("validation", "equal"))
    threshold_percentile: float = param(99.0, "default threshold before validation: this percentile of the "
                                        "combined out-of-fold normal scores", minimum=0.0, maximum=100.0)
    refit_folds: str = param("one", REFIT_FOLDS_HELP, choices=REFIT_FOLDS)


class EnsembleModel(nn.Module):
    """uint8 images -> (mean standardised score, mean standardised map of the members with maps). ``scale`` holds
    each member's divisor: its normal spread divided by (members x its weight), so the mean is the weighted one
    (the spread alone with equal weights)."""

    centre: torch.Tensor
    scale: torch.Tensor

    def __init__(self, members: Sequence[nn.Module], centre: torch.Tensor, scale: torch.Tensor,
                 with_maps: Sequence[bool]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.with_maps = [bool(m) for m in with_maps]
        self.register_buffer("centre", centre)
        self.register_buffer("scale", scale)
        self.shared = False  # set by share_backbone once the tensors are in place
        self.host = 0  # shared: the member whose backbone runs, and each member's levels among its outputs
        self.picks: list[list[int]] = []
        self.register_load_state_dict_post_hook(_share_after_load)

    def share_backbone(self) -> bool:
        """Run the backbone once for every member where each member can take computed levels and one member's
        backbone computes every other's (normalisation and extractor: same architecture and weights, its levels
        a superset of theirs: SVDD's levels 0-3 serve PaDiM's 1-3). Call after the members' tensors are final
        (fit, or load_state_dict)."""
        found = [p for p in map(_backbone_of, self.members) if p is not None]
        self.shared = False
        if len(found) < len(self.members):
            return False
        for host, candidate in enumerate(found):
            if all(_covers(candidate, other) for other in found):
                levels = sorted(cast(Any, candidate[1]).layers)  # an extractor returns its levels finest first
                self.host, self.shared = host, True
                self.picks = [[levels.index(level) for level in sorted(cast(Any, other[1]).layers)] for other in found]
                break
        return self.shared

    def combine(self, outputs: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """Each member's (scores, [maps]) -> the ensemble's: (scores - t) / s, averaged over members."""
        scores = torch.stack([(o[0].float() - self.centre[i]) / self.scale[i] for i, o in enumerate(outputs)])
        maps = [(o[1].float() - self.centre[i]) / self.scale[i] for i, o in enumerate(outputs) if self.with_maps[i]]
        if not maps:
            return (scores.mean(0),)
        return scores.mean(0), torch.stack(maps).mean(0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.shared:
            normalize, extractor = cast(Any, self.members[self.host]).backbone()
            levels = extractor(normalize(x))
            return self.combine([cast(Any, m).from_levels([levels[i] for i in pick])
                                 for m, pick in zip(self.members, self.picks)])
        return self.combine([m(x) for m in self.members])


def validation_weights(normal_z: Sequence[np.ndarray], defect_z: Sequence[np.ndarray], step: float = WEIGHT_STEP,
                       tie: float = WEIGHT_TIE) -> np.ndarray:
    """Member weights (summing to 1, each a multiple of ``step`` and at least one) whose weighted sum of the members'
    standardised out-of-fold scores separates the normals from the synthetic defects best (AUROC); among the
    weights within ``tie`` of the best (equal weights always a candidate), the nearest to equal, so a validation
    that cannot tell the members apart leaves the plain mean."""
    from sklearn.metrics import roc_auc_score

    m = len(normal_z)
    equal = np.full(m, 1.0 / m)
    n_normal, n_defect = len(normal_z[0]), len(defect_z[0])
    if m < 2 or not n_normal or not n_defect:
        return equal
    labels = np.r_[np.zeros(n_normal), np.ones(n_defect)]
    scores = np.stack([np.r_[a, b] for a, b in zip(normal_z, defect_z)])  # (members, images)
    units = round(1.0 / step)
    grid = [np.diff(np.r_[0, cuts, units]) / units  # compositions of ``units`` into m positive parts
            for cuts in itertools.combinations(range(1, units), m - 1)]
    candidates = [equal, *grid]
    aucs = np.array([roc_auc_score(labels, w @ scores) for w in candidates])
    near = [w for w, a in zip(candidates, aucs) if a >= aucs.max() - tie]
    return min(near, key=lambda w: float(np.abs(w - equal).sum()))


@register_method("ensemble")
class EnsembleDetector(EnsembleParams, Detector):
    """Members fitted and validated one by one; the model averages their standardised scores."""

    Params = EnsembleParams
    members_: list[Detector]
    weights_: np.ndarray
    legacy_params: ClassVar[dict[str, Any]] = {"weighting": "equal"}  # files from before: the plain mean

    @property
    def has_maps(self) -> bool:  # type: ignore[override]  # per instance: maps where any member has them
        return any(get_method(name).has_maps for name in self.members)

    @property
    def onnx_unsupported(self) -> str | None:  # type: ignore[override]
        reasons = [f"{name}: {get_method(name).onnx_unsupported}" for name in self.members
                   if get_method(name).onnx_unsupported]
        return "; ".join(reasons) or None

    def feature_layers(self) -> list[int]:
        return sorted({level for m in self._member_detectors() for level in m.feature_layers()})

    # ------------------------------------------------------------------ members
    def _check_members(self) -> None:
        known = [m for m in list_methods() if m != "ensemble"]
        bad = [m for m in self.members if m not in known]
        if bad or len(self.members) < 2 or len(set(self.members)) != len(self.members):
            raise InsightADError(f"members: expected at least two different methods of {', '.join(known)}, "
                                 f"got {list(self.members)!r}")

    def _member_detectors(self) -> list[Detector]:
        """Unfitted members: each method's defaults with the ensemble's backbone, size, device and seed."""
        self._check_members()
        out = []
        for name in self.members:
            cls = get_method(name)
            out.append(cls(**{k: getattr(self, k) for k in SHARED if k in cls.param_names()}))
        return out

    # ------------------------------------------------------------------ fit
    def _fit(self, images: Sequence, progress: bool) -> None:
        if is_tiled(self):
            raise InsightADError("ensemble: members are fitted whole; tiling is not supported")
        members = self._member_detectors()
        for m in members:
            m.fit(images, progress=progress)
            validate_and_decide(m, images, folds=DEFAULT_FOLDS, seed=self.seed, refit_folds=self.refit_folds)
        first = members[0].preprocessing_
        for m in members[1:]:
            if m.preprocessing_ != first:
                raise InsightADError(f"ensemble: {m.method} reads images differently from {members[0].method} "
                                     "(another backbone normalisation or size); members must share their input")
        self.members_ = members
        self.preprocessing_ = first
        self.backbone_arch_ = members[0].backbone_arch_
        self.backbone_source_ = getattr(members[0], "backbone_source_", None)
        self.fit_engine_ = getattr(members[0], "fit_engine_", self.fit_engine)
        centre = torch.tensor([m.threshold_ for m in members], dtype=torch.float32)
        spread = torch.tensor([float(m.threshold_info_["scale"]) for m in members], dtype=torch.float32)
        self.model_ = EnsembleModel([m._model_as(nn.Module) for m in members], centre, spread.clone(),
                                    [m.has_maps for m in members]).to(self.device_).eval()
        self.model_.share_backbone()
        parts = self._member_validation(DEFAULT_FOLDS, self.seed)
        if parts is None:  # unreachable: the members were validated with these folds just now
            raise InsightADError("ensemble: the members' validations do not line up")
        self.weights_ = np.full(len(members), 1.0 / len(members))
        if self.weighting == "validation":
            self.weights_ = validation_weights(parts.normal_z, parts.defect_z)
        self.model_.scale.copy_(spread / (len(members) * torch.as_tensor(self.weights_, dtype=torch.float32)))
        oof = self.members_out_of_fold(DEFAULT_FOLDS, self.seed)
        if oof is None:
            raise InsightADError("ensemble: the members' validations do not line up")
        self.decision_scores_, self.decision_source_ = oof.normal_scores, "holdout"

    def weights_summary(self) -> str:
        """One line: each member's weight and how the weights were chosen."""
        return ("member weights " + ", ".join(f"{m} {w:.1f}" for m, w in zip(self.members, self.weights_))
                + f" ({self.weighting})")

    def members_out_of_fold(self, folds: int, seed: int) -> OutOfFold | None:
        """The ensemble's out-of-fold scores from its members' own validations (the normals and synthetic
        defects every member scored), or None where they were validated with other folds or seed."""
        parts = self._member_validation(folds, seed)
        if parts is None:
            return None
        maps = parts.defect_maps
        defect_maps = [np.mean([m[j] for m in maps], axis=0).astype(np.float32) for j in range(len(parts.defects))] \
            if maps else None
        return OutOfFold("members", parts.normals, np.mean(parts.normal_z, axis=0), parts.defects,
                         np.mean(parts.defect_z, axis=0), defect_maps,
                         np.mean(parts.map_max, axis=0) if parts.map_max else None)  # map maxima: the members' mean

    def _member_validation(self, folds: int, seed: int) -> _MemberValidation | None:
        """Each member's out-of-fold scores (and maps) on the normals and synthetic defects all of them scored,
        divided as the model divides them (``EnsembleModel.scale``), or None where the members were validated with
        other folds or seed (or their validations were not kept: a loaded model)."""
        members = getattr(self, "members_", None)
        if not members or (folds, seed) != (DEFAULT_FOLDS, self.seed):
            return None
        valid = [v for v in (getattr(m, "validation_", None) for m in members) if isinstance(v, OutOfFold)]
        if len(valid) != len(members):  # a loaded model: its members' validations were not saved
            return None
        model = self._model_as(EnsembleModel)
        centre, scale = model.centre.double().numpy(), model.scale.double().numpy()

        def z(i: int, values: Any) -> np.ndarray:  # member i's scores (or a map) on its normal spread
            return (np.asarray(values, dtype=np.float64) - centre[i]) / scale[i]

        common = set.intersection(*(set(v.normal_index.tolist()) for v in valid))
        normals = np.array(sorted(common), dtype=np.int64)
        normal_z = [z(i, _by_index(v.normal_index, v.normal_scores, normals)) for i, v in enumerate(valid)]
        first = valid[0]
        keep = [j for j, d in enumerate(first.defects) if d.source in common]
        defect_z, maps, map_max = [], [], []
        for i, v in enumerate(valid):
            at = {(d.source, d.kind): j for j, d in enumerate(v.defects)}
            try:
                rows = [at[(first.defects[j].source, first.defects[j].kind)] for j in keep]
            except KeyError:  # another synthetic defect for the same normal: they cannot combine
                return None
            defect_z.append(z(i, v.defect_scores[rows]))
            if model.with_maps[i] and v.defect_maps is not None and v.normal_map_max is not None:
                maps.append([z(i, v.defect_maps[r]) for r in rows])
                map_max.append(z(i, _by_index(v.normal_index, v.normal_map_max, normals)))
        return _MemberValidation(normals, normal_z, [first.defects[j] for j in keep], defect_z, maps, map_max)

    # ------------------------------------------------------------------ predict
    @torch.inference_mode()
    def forward_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member on its own fast path (PatchCore's index, the cached backbone graphs), then combined."""
        model = self._model_as(EnsembleModel)
        if model.shared:  # one backbone pass for every member
            return super().forward_tensor(x)
        return model.combine([m.forward_tensor(x) for m in self.members_])

    # ------------------------------------------------------------------ persistence
    def state_metadata(self) -> dict[str, Any]:
        members = [{"method": m.method, "params": m.get_params(), "state": m.state_metadata(),
                    "threshold": {"value": m.threshold_, "strategy": m.threshold_strategy_, "details": m.threshold_info_}}
                   for m in self.members_]
        return {"weights": [round(float(w), 6) for w in self.weights_], "members": members}

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> nn.Module:
        entries = state.get("members")
        if not isinstance(entries, list) or [e.get("method") for e in entries] != list(self.members):
            raise InsightADError(f"model metadata field 'state.members': expected one entry per member "
                                 f"{list(self.members)!r}")
        members, modules = [], []
        for i, entry in enumerate(entries):
            m = get_method(entry["method"]).from_params({**entry["params"], "device": self.device})
            m.preprocessing_, m.device_ = self.preprocessing_, self.device_
            m.backbone_arch_ = getattr(self, "backbone_arch_", None)
            prefix = f"members.{i}."
            module = m._restore({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                entry.get("state") or {})
            m.model_ = module  # the same module object the ensemble's state dict fills
            thr = entry.get("threshold") or {}
            m.set_threshold(thr["value"], thr["strategy"], **(thr.get("details") or {}))
            members.append(m)
            modules.append(module)
        self.members_ = members
        n = len(members)
        weights = state.get("weights")
        self.weights_ = np.asarray(weights, dtype=np.float64) if isinstance(weights, list) and len(weights) == n \
            else np.full(n, 1.0 / n)  # files from before the weights: the plain mean (their scales are the spreads)
        return EnsembleModel(modules, torch.empty(n), torch.empty(n), [m.has_maps for m in members])


@dataclass
class _MemberValidation:
    """The members' out-of-fold results on their common images, each on the model's divisor (lists per member)."""

    normals: np.ndarray
    normal_z: list[np.ndarray]
    defects: list
    defect_z: list[np.ndarray]
    defect_maps: list[list[np.ndarray]]
    map_max: list[np.ndarray]


def _share_after_load(module: nn.Module, _keys: Any) -> None:
    """A loaded file's members hold their final tensors only now: look again for a shared backbone."""
    cast(EnsembleModel, module).share_backbone()


def _backbone_of(member: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(normalize, extractor) of a member model that can score computed levels (``from_levels``), else None."""
    if not callable(getattr(member, "from_levels", None)) or not callable(getattr(member, "backbone", None)):
        return None
    return cast(Any, member).backbone()


def _covers(a: tuple[nn.Module, nn.Module], b: tuple[nn.Module, nn.Module]) -> bool:
    """Whether the (normalize, extractor) pair ``a`` computes every level ``b`` does, as ``b`` does: same extractor
    architecture, ``b``'s levels among ``a``'s, equal tensors (a backbone cut after another deepest level has
    other tensors)."""
    if getattr(a[1], "arch", None) != getattr(b[1], "arch", None) or not set(getattr(b[1], "layers", ())) <= set(
            getattr(a[1], "layers", ())):
        return False
    for x, y in zip(a, b):
        sx, sy = x.state_dict(), y.state_dict()
        if sx.keys() != sy.keys() or any(not torch.equal(sx[k], sy[k]) for k in sx):
            return False
    return True


def _by_index(index: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``values`` (aligned with ``index``) at the image indices ``wanted``."""
    pos = {int(i): j for j, i in enumerate(index.tolist())}
    return np.asarray(values, dtype=np.float64)[[pos[int(i)] for i in wanted]]
