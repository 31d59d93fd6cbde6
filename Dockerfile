# syntax=docker/dockerfile:1
# InsightAD inference server (POST /infer on port 8080). Two images from this file:
#
#   docker build -t insightad-server .                                  # full: PyTorch wheels from PyPI
#   docker build --build-arg TORCH_VARIANT=cpu -t insightad-server .    # full, CPU-only PyTorch (much smaller)
#   docker build --target runtime -t insightad-runtime .                # runtime: ONNX Runtime only, no PyTorch
#
#   docker run --rm -p 8080:8080 \
#       -v "$PWD/model.safetensors:/models/model.safetensors:ro" insightad-server [extra serve flags]
#   docker run --rm -p 8080:8080 -v "$PWD/model.onnx:/models/model.onnx:ro" insightad-runtime
#
# The runtime image scores exported models (insightad export, or the .onnx that train writes beside the
# model file); the full image also scores model files on PyTorch. Without a Docker daemon,
# docker/build-runtime.sh builds the runtime image with buildah (docker/runtime.Containerfile).
# A model file placed in docker/models/ before the build is baked into the image; otherwise mount one.
# Set INSIGHTAD_API_KEY (docker run -e) to require an API key.
ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- runtime: scoring and serving, no PyTorch
FROM python:${PYTHON_VERSION}-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/insightad
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY docker/install.sh docker/entrypoint.sh docker/healthcheck.py ./docker/
RUN INSIGHTAD_EXTRAS="" sh docker/install.sh /opt/insightad && rm -rf build src/*.egg-info

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin insightad
COPY docker/models/ /models/

ENV INSIGHTAD_MODEL=/models/model.onnx \
    INSIGHTAD_HOST=0.0.0.0 \
    INSIGHTAD_PORT=8080 \
    INSIGHTAD_OFFLINE=1

USER insightad
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/insightad/docker/healthcheck.py"]
ENTRYPOINT ["sh", "/opt/insightad/docker/entrypoint.sh"]
CMD []

# ---------------------------------------------------------------- full (default): the runtime plus PyTorch
FROM runtime AS full

# default: PyTorch as pip resolves it; cpu: CPU-only wheels from TORCH_INDEX_URL (when reachable)
ARG TORCH_VARIANT=default
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER root
RUN TORCH_VARIANT="$TORCH_VARIANT" TORCH_INDEX_URL="$TORCH_INDEX_URL" INSIGHTAD_EXTRAS=train \
    sh docker/install.sh /opt/insightad && rm -rf build src/*.egg-info

ENV INSIGHTAD_MODEL=/models/model.safetensors
USER insightad
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/insightad/docker/healthcheck.py"]
