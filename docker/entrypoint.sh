#!/bin/sh
# Start the InsightAD inference server: the model from INSIGHTAD_MODEL, listening on
# INSIGHTAD_HOST:INSIGHTAD_PORT (0.0.0.0:8080 in the image). Extra arguments go to `insightad serve`
# (e.g. --max-batch 4 --queue-size 32). The API key, if any, comes from INSIGHTAD_API_KEY.
set -eu

model="${INSIGHTAD_MODEL:-/models/model.safetensors}"
if [ ! -f "$model" ]; then
    echo "insightad: error: no model file at $model; mount one (docker run -v \$PWD/model.onnx:$model:ro ...)," \
         "copy one in at build time (docker/models/), or set INSIGHTAD_MODEL" >&2
    exit 1
fi
exec insightad serve --model "$model" --host "${INSIGHTAD_HOST:-0.0.0.0}" --port "${INSIGHTAD_PORT:-8080}" "$@"
