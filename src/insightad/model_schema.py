"""The one schema a model file's JSON metadata must follow, checked before anything is built from it.

A model file may come from anywhere: every field is checked here (types, ranges, sizes) so that a
hostile or damaged file gets one line naming the file and the field, never a traceback, and never
an allocation sized by the file (a 60000x60000 input, a giant backbone) before it is refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from insightad.config import LEVEL_NAME, MAX_IMAGE_SIDE
from insightad.errors import InsightADError, cut

FORMAT = "insightad-model"
FORMAT_VERSION = 1
MAX_DEPTH = 32  # JSON nesting deeper than this is refused before validation
MAX_SHOWN = 80  # characters of a bad value quoted in a message

RESIZE_FILTERS = ("bilinear", "bicubic", "nearest", "area")


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("expected a finite number")
    return v


Finite = Annotated[StrictFloat, AfterValidator(_finite)]
Side = Annotated[StrictInt, Field(ge=1, le=MAX_IMAGE_SIDE)]
Name = Annotated[StrictStr, Field(max_length=1000)]
LevelName = Annotated[StrictStr, Field(max_length=200, pattern=f"^{LEVEL_NAME.pattern}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow")


class PreprocessingMeta(_Strict):
    size: tuple[Side, Side]
    channels: Literal[1, 3]
    resize: Literal["bilinear", "bicubic", "nearest", "area"]
    mean: Annotated[list[Finite], Field(min_length=1, max_length=3)]
    std: Annotated[list[Annotated[Finite, Field(gt=0)]], Field(min_length=1, max_length=3)]


class BackboneMeta(_Strict):
    name: Name
    arch: Name | None = None
    weights_source: Annotated[StrictStr, Field(max_length=10_000)] | None = None
    # levels by number, or by module name (``blocks.2``: the --layers flag and config files take both)
    layers: Annotated[list[Annotated[StrictInt, Field(ge=0, le=16)] | LevelName], Field(max_length=16)] = []


class ThresholdDetails(_Strict):
    scale: Annotated[Finite, Field(ge=0)] | None = None


class ThresholdMeta(_Strict):
    value: Finite
    strategy: Name
    details: ThresholdDetails = ThresholdDetails()


class BackboneTrainingMeta(_Strict):
    """The images an ``ssl:`` backbone was fine-tuned on (evaluate refuses them too)."""

    file: StrictStr
    root: StrictStr
    train: list[StrictStr] = []
    train_sha256: list[StrictStr] = []  # the content of each training file (files written before: none)


class SplitMeta(_Strict):
    root: StrictStr
    layout: Name
    holdout_fraction: Finite = 0.0
    seed: StrictInt = 0
    train: list[StrictStr] = []
    train_sha256: list[StrictStr] = []  # the content of each training file (files written before: none)
    holdout: list[StrictStr] = []
    backbone: BackboneTrainingMeta | None = None


class TrainingMeta(_Strict):
    n_images: Annotated[StrictInt, Field(ge=0)] | None = None
    fit_seconds: Finite | None = None
    fit_engine: Name | None = None


class ModelMeta(_Strict):
    """Every field the loader reads; unknown extra fields are kept (a newer minor writer's notes)."""

    format: Literal["insightad-model"]
    format_version: Annotated[StrictInt, Field(ge=1)]
    package_version: Name | None = None
    created: Name | None = None
    method: Name
    params: dict[str, Any]
    preprocessing: PreprocessingMeta
    backbone: BackboneMeta | None = None
    threshold: ThresholdMeta
    split: SplitMeta | None = None
    training: TrainingMeta | None = None
    state: dict[str, Any] = {}


class OnnxExportMeta(_Strict):
    """Every field of an ONNX export's ``insightad`` metadata entry that scoring reads (the graph's own input is
    checked against ``channels`` by ``engines.onnx_runtime.check_metadata``); other fields are notes."""

    format: Literal["insightad-onnx"]
    method: Name
    has_maps: StrictBool
    threshold: Finite
    threshold_strategy: Name | None = None
    threshold_details: ThresholdDetails | None = None
    input_height: Side
    input_width: Side
    channels: Literal[1, 3]
    resize: Literal["bilinear", "bicubic", "nearest", "area"]
    mean: Annotated[list[Finite], Field(min_length=1, max_length=3)]
    std: Annotated[list[Annotated[Finite, Field(gt=0)]], Field(min_length=1, max_length=3)]
    tiles: Annotated[StrictInt, Field(ge=1, le=16)] | None = None  # graphs exported before the key: none
    split: SplitMeta | None = None  # the training split (exports made before it was recorded: none)


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a 20 MB field never lands on a terminal."""
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit])
    if len(text) > limit + 2:
        text = text[:limit] + "..."
    elif isinstance(value, str) and len(value) > limit:
        text = text[:-1] + f"...' ({len(value)} characters)"
    return text


def nesting_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of a JSON value, walked without recursion; stops counting past ``limit``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children)
    return deepest


def _field_name(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "metadata"


def validate_metadata(meta: Any, where: str, check_params: bool = True) -> dict[str, Any]:
    """``meta`` checked against :class:`ModelMeta`; the first problem as one line naming ``where`` and the field.
    ``check_params``: also check the method and its hyper-parameters against the registered methods (this
    imports them, PyTorch included; scoring through a stored graph does not need them)."""
    if not isinstance(meta, dict):
        raise InsightADError(f"{where}: model metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise InsightADError(f"{where}: not an InsightAD model file (format {shorten(meta.get('format'))})")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise InsightADError(f"{where}: model file format {version} is newer than this InsightAD reads "
                             f"({FORMAT_VERSION}); upgrade insightad")
    if nesting_depth(meta) > MAX_DEPTH:
        raise InsightADError(f"{where}: model metadata is nested deeper than {MAX_DEPTH} levels; refusing it")
    _validate(ModelMeta, meta, f"{where}: model metadata")
    if not check_params:
        return meta
    from insightad.methods import get_method, list_methods

    if meta["method"] not in list_methods():
        raise InsightADError(f"{where}: model metadata field 'method': unknown method {shorten(meta['method'])} "
                             f"(known: {', '.join(list_methods())})")
    from insightad import config

    try:
        config.build(get_method(meta["method"]).Params, meta["params"], where="params")
    except InsightADError as e:
        raise InsightADError(f"{where}: model metadata field 'params': {cut(str(e), 300)}") from None
    except TypeError as e:  # a value of a type the dataclass cannot take at all
        raise InsightADError(f"{where}: model metadata field 'params': {cut(str(e), 300)}") from None
    return meta


def _validate(schema: type[BaseModel], meta: dict[str, Any], what: str) -> None:
    """``meta`` checked against ``schema``; the first problem as one line: ``<what> field '<field>': <why>``."""
    try:
        schema.model_validate(meta)
    except ValidationError as e:
        err = e.errors()[0]
        field = _field_name(err.get("loc", ()))
        got = err.get("input", None) if err.get("type") != "missing" else None
        why = "missing" if err.get("type") == "missing" else f"{err.get('msg', 'invalid')}, got {shorten(got)}"
        raise InsightADError(f"{what} field '{field}': {why}") from None


def validate_onnx_metadata(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """An ONNX export's ``insightad`` metadata checked against :class:`OnnxExportMeta`: an export edited or made
    elsewhere gets one line naming ``where`` and the field, never a traceback while it is read or scores."""
    if nesting_depth(meta) > MAX_DEPTH:
        raise InsightADError(f"{where}: ONNX export metadata is nested deeper than {MAX_DEPTH} levels; refusing it")
    _validate(OnnxExportMeta, meta, f"{where}: ONNX export metadata")
    return meta
