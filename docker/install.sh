#!/bin/sh
# Install InsightAD with its HTTP server into the current Python environment, pinned by constraints.txt.
#
#   docker/install.sh [PROJECT_DIR] [extra pip arguments...]
#
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

case "${TORCH_VARIANT:-default}" in
    default) ;;
    cpu)
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

"$py" -m pip install -c "$constraints" "$@" "$src[serve]"
"$py" -c "import fastapi, uvicorn, insightad; print('installed insightad', insightad.__version__)"
