"""The operators' web page: ``mount_page(app, ...)`` adds ``/`` (the page), ``/assets/*`` (its files),
``GET /colorbar.png`` (the colour bar of the served model's heatmaps) and ``/redoc``.

The page is plain HTML, CSS and JavaScript shipped inside the package (``static/``): no CDN, no
build step, nothing fetched from anywhere but this server, which its Content-Security-Policy
enforces. It talks to the same JSON API as any client (``/infer``, ``/model``, ``/health``) and
sends the API key, when the server has one, in the ``X-API-Key`` header.

``/docs`` and ``/redoc`` use the Swagger UI and ReDoc files shipped by the ``fastapi-offline``
package. ReDoc's page would still load its attribution logo from a CDN, so ``/redoc`` is served
here with a Content-Security-Policy that keeps the browser on this server.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.params import Depends
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from insightad.engines.cache import model_digest
from insightad.render.colormap import MapScale, colorbar

STATIC = Path(__file__).parent / "static"

# Everything from this origin only; images may also be blob:/data: URLs the page makes itself.
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")
DOCS_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' blob:; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:")


def served_model_sha256(det: Any) -> str | None:
    """SHA-256 of the file the detector was loaded from, else None: read at startup from the digest remembered
    for this version of the file (``engines.cache.model_digest``; a 230 MB PaDiM graph took 0.2-0.5 s to hash
    again at every start, a quarter of the time to the first answer)."""
    path = getattr(det, "model_path_", None)
    return model_digest(path) if path and Path(path).is_file() else None


def colorbar_png(scale: MapScale, height: int = 256) -> bytes:
    """The labelled colour bar of ``scale`` as PNG bytes."""
    buf = io.BytesIO()
    colorbar(scale, height=height, width=120).save(buf, format="PNG")
    return buf.getvalue()


def mount_page(app: FastAPI, det: Any, scale: MapScale | None, protected: list[Depends]) -> None:
    """Serve the page at ``/`` and its assets; ``protected`` guards what reveals the model (API key)."""
    if not (STATIC / "index.html").is_file():
        raise FileNotFoundError(f"{STATIC / 'index.html'}: the page's files are missing from this install")
    bar = colorbar_png(scale) if (det.has_maps and scale is not None) else None
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/colorbar.png", dependencies=protected, response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "the method gives no maps"}},
             summary="The colour bar of /infer's heatmaps, labelled with raw map values")
    async def colorbar_image() -> Response:
        if bar is None:
            return Response('{"detail": "this model gives no anomaly maps, so no colour bar"}', status_code=404,
                            media_type="application/json")
        return Response(bar, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        files = f"{root}{app.url_path_for('static-offline-docs', path='')}"  # fastapi-offline's mount
        page = get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{files}redoc.standalone.js", redoc_favicon_url=f"{files}favicon.png",
                              with_google_fonts=False)
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    app.mount("/assets", StaticFiles(directory=STATIC), name="page-assets")
