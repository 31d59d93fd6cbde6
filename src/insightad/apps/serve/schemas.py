"""Request and response bodies of the HTTP API (pydantic models; they also document the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class InferRequest(BaseModel):
    """One base64-encoded image (PNG, JPEG, BMP or TIFF, any size): the original request contract."""

    image: str = Field(description="base64 of an encoded image file (a data: URL prefix is allowed)")
    heatmap: StrictBool = Field(False, description="also return the anomaly map as a base64 PNG (methods with maps; "
                                "JSON true or false)")


class BatchRequest(BaseModel):
    """Several images scored in one request; results come back in the same order."""

    images: list[str] = Field(min_length=1, description="base64 of encoded image files")
    heatmap: StrictBool = Field(False, description="also return each anomaly map as a base64 PNG (methods with "
                                "maps; JSON true or false)")


class InferResponse(BaseModel):
    """The ``Anomaly`` decision of the original contract, plus the same record as ``insightad predict --json``."""

    model_config = ConfigDict(populate_by_name=True)

    Anomaly: bool = Field(description="score > threshold (the original contract's name)")
    anomalous: bool = Field(description="the same decision, under the name every machine-readable output uses")
    score: float = Field(description="raw anomaly score (higher = more anomalous)")
    score_normalized: float | None = Field(None, description="logistic map of the score: 0.5 at the threshold")
    threshold: float = Field(description="the decision threshold in use")
    method: str = Field(description="detection method of the served model")
    heatmap: str | None = Field(None, description="base64 RGBA PNG of the anomaly map at the input's size (at most "
                                "1024 px on its long side), in the product's colour convention: the colour of "
                                "map value m is jet(1 / (1 + exp(-(m - heatmap_level) / heatmap_scale)))")
    heatmap_level: float | None = Field(None, description="map value drawn at the middle of the colour scale "
                                        "(the pixel threshold)")
    heatmap_scale: float | None = Field(None, description="spread of the colour scale around heatmap_level")


class BatchResponse(BaseModel):
    results: list[InferResponse]


class Health(BaseModel):
    status: str = Field(description="'ok' when the model is loaded and the inference worker runs")
    model_loaded: bool
    worker_alive: bool
    queue_depth: int


class ModelInfo(BaseModel):
    method: str
    has_maps: bool
    backbone: dict[str, Any] | None
    threshold: dict[str, Any]
    preprocessing: dict[str, Any]
    version: dict[str, Any] = Field(description="package that serves, package and format that wrote the model")
    params: dict[str, Any]
    model_sha256: str | None = Field(None, description="SHA-256 of the served model file (threshold and label "
                                     "files carry it); null when the model was not loaded from a file")


class ErrorResponse(BaseModel):
    detail: Any = Field(description="what was wrong, in one line (422: the validation errors)")
