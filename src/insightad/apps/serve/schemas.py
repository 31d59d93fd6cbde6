"""Request and response bodies of the HTTP API (pydantic models; they also document the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HeatmapStyle = Literal["gray", "color"]
STYLE_DOC = ("'gray': `heatmap` is the raw map as an 8-bit grey PNG at the input's size; 'color': "
             "`heatmap_color` is an RGBA PNG in the product's colour convention (at most 1024 px a side; "
             "alpha fades regions below the level) with `heatmap_level` and `heatmap_scale`")


class InferRequest(BaseModel):
    """The second seed's request: one base64-encoded image (PNG, JPEG, BMP or TIFF, any size)."""

    image: str = Field(description="base64 of an encoded image file (a data: URL prefix is allowed)")
    heatmap: bool = Field(False, description="also return the anomaly map as a base64 PNG (methods with maps)")
    heatmap_style: HeatmapStyle = Field("gray", description=STYLE_DOC)


class BatchRequest(BaseModel):
    """Several images scored in one request; results come back in the same order."""

    images: list[str] = Field(min_length=1, description="base64 of encoded image files")
    heatmap: bool = Field(False, description="also return each anomaly map as a base64 PNG (methods with maps)")
    heatmap_style: HeatmapStyle = Field("gray", description=STYLE_DOC)


class InferResponse(BaseModel):
    """The seed's ``Anomaly`` decision plus the raw score, the threshold it was compared with and the method."""

    model_config = ConfigDict(populate_by_name=True)

    Anomaly: bool = Field(description="score > threshold")
    score: float = Field(description="raw anomaly score (higher = more anomalous)")
    threshold: float = Field(description="the decision threshold in use")
    method: str = Field(description="detection method of the served model")
    heatmap: str | None = Field(None, description="base64 8-bit grayscale PNG of the anomaly map at the input's "
                                "size; value v means heatmap_min + v/255 * (heatmap_max - heatmap_min)")
    heatmap_min: float | None = Field(None, description="map value that PNG value 0 stands for")
    heatmap_max: float | None = Field(None, description="map value that PNG value 255 stands for")
    score_normalized: float | None = Field(None, description="1 / (1 + exp(-(score - threshold) / scale)): "
                                           "0.5 at the threshold (the raw score stays the decision's input)")
    heatmap_color: str | None = Field(None, description="heatmap_style 'color': base64 RGBA PNG, jet colours over "
                                      "1 / (1 + exp(-(m - heatmap_level) / heatmap_scale)), alpha = that ** 1.5")
    heatmap_level: float | None = Field(None, description="map value drawn at the middle of the colour bar")
    heatmap_scale: float | None = Field(None, description="spread of the colour scale, in map units")


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
