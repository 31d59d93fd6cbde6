#!/bin/sh
# Install InsightAD with its HTTP server into the current Python environment, pinned by constraints.txt.
#
#   docker/install.sh [PROJECT_DIR] [extra pip arguments...]
#
# INSIGHTAD_EXTRAS=train  the full image: the runtime plus PyTorch (train, export, the PyTorch engine).
# INSIGHTAD_EXTRAS=       the runtime image: scoring and serving exported .onnx models, no PyTorch.
# TORCH_VARIANT=default  PyTorch wheels from the package index pip uses (CUDA builds on Linux x86-64).
# TORCH_VARIANT=cpu      CPU-only PyTorch wheels (a far smaller image) from TORCH_INDEX_URL
#                        (default https://download.pytorch.org/whl/cpu), where that index is reachable.
# PYTHON                 the interpreter to install into (default: python).
# The Dockerfile runs this script; tests run it too, in a fresh virtual environment.
set -eu

src="${1:-.}"
[ "$#" -gt 0 ] && shift
src="$(cd "$src" && pwd)"  # an absolute path: pip reads "name[extra]" without a slash as a package name
py="${PYTHON:-python}"
constraints="$src/constraints.txt"
if [ ! -f "$constraints" ] || [ ! -f "$src/pyproject.toml" ]; then
    echo "install.sh: $src is not the InsightAD project (expected pyproject.toml and constraints.txt)" >&2
    exit 2
fi

extras="${INSIGHTAD_EXTRAS-train}"
case ",$extras," in
    *,train,*|*,all,*) torch=1 ;;
    *) torch=0 ;;
esac

case "${TORCH_VARIANT:-default}" in
    default) ;;
    cpu)
        [ "$torch" = 1 ] || { echo "install.sh: TORCH_VARIANT=cpu needs INSIGHTAD_EXTRAS with train" >&2; exit 2; }
        index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
        echo "install.sh: CPU-only PyTorch wheels from $index"
        # The constraints pin torch==X; the CPU wheel is X+cpu, which that pin accepts.
        "$py" -m pip install -c "$constraints" --index-url "$index" "$@" torch torchvision
        ;;
    *)
        echo "install.sh: TORCH_VARIANT must be 'default' or 'cpu', got '${TORCH_VARIANT}'" >&2
        exit 2
        ;;
esac

if [ -n "$extras" ]; then
    "$py" -m pip install -c "$constraints" "$@" "$src[$extras]"
else
    "$py" -m pip install -c "$constraints" "$@" "$src"
fi
"$py" -c "import fastapi, uvicorn, insightad; print('installed insightad', insightad.__version__)"
