"""HTTP inference server (FastAPI on uvicorn): ``create_app(model, settings)`` and its parts.

Modules: ``app`` (routes, error handling), ``worker`` (micro-batching inference thread with a
bounded queue), ``codec`` (base64 / image decoding with the model's own preprocessing, heatmap
PNGs), ``limits`` (request-body size limit), ``security`` (API key), ``metrics`` (Prometheus).
"""

from insightad.apps.serve.app import create_app

__all__ = ["create_app"]
