#!/bin/sh
# Build the runtime image (no PyTorch) without a Docker daemon, then optionally try it on a model.
#
#   sudo docker/build-runtime.sh [MODEL.onnx IMAGE.png]
#
# Needs root, buildah and mmdebstrap (apt-get install buildah mmdebstrap) and the Debian and Python
# package indexes at build time only. Steps: a Debian minbase rootfs with python3 (mmdebstrap), a
# wheelhouse of insightad and its runtime dependencies (pip), `buildah bud` of docker/runtime.Containerfile
# (FROM scratch + ADD rootfs.tar; vfs storage, chroot isolation: no daemon, no overlay mounts), the image
# size. With MODEL.onnx and IMAGE.png: the server started inside the image (`buildah run`, the model
# mounted read-only, loopback only), one POST /infer answered, the server stopped.
#
# Environment: IMAGE (default insightad-runtime), SUITE (default bookworm, whose python3 the wheels must
# match), WORK (default build/runtime-image), PYTHON (default python3: runs pip on this machine), PORT.
set -eu

root="$(cd "$(dirname "$0")/.." && pwd)"
image="${IMAGE:-insightad-runtime}"
suite="${SUITE:-bookworm}"
work="${WORK:-$root/build/runtime-image}"
py="${PYTHON:-python3}"
port="${PORT:-18080}"
storage="--storage-driver vfs"

for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "build-runtime: $tool is missing (apt-get install buildah mmdebstrap)" >&2; exit 2; }
done
ctx="$work/context"
mkdir -p "$ctx/docker" "$ctx/wheels"

echo "build-runtime: [1/4] Debian $suite minbase + python3 -> $ctx/rootfs.tar"
if [ ! -s "$ctx/rootfs.tar" ]; then
    mmdebstrap --variant=minbase --include=python3,python3-venv --quiet \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$suite" "$ctx/rootfs.tar.part"
    mv "$ctx/rootfs.tar.part" "$ctx/rootfs.tar"
fi

echo "build-runtime: [2/4] wheelhouse: insightad (no extras) and its runtime dependencies"
rm -f "$ctx"/wheels/insightad-*.whl
"$py" -m pip wheel --quiet --no-deps -w "$ctx/wheels" "$root"
"$py" -m pip download --quiet -c "$root/constraints.txt" -d "$ctx/wheels" "$ctx"/wheels/insightad-*.whl
if ls "$ctx"/wheels | grep -qiE '^(torch|timm|torchvision)-'; then
    echo "build-runtime: the wheelhouse holds PyTorch; the runtime must not need it" >&2
    exit 1
fi
cp "$root/docker/runtime.Containerfile" "$root/docker/entrypoint.sh" "$root/docker/healthcheck.py" "$ctx/docker/"

echo "build-runtime: [3/4] buildah bud -> $image"
buildah $storage bud --isolation chroot --layers=false -f "$ctx/docker/runtime.Containerfile" -t "$image" "$ctx"
size=$(buildah $storage images --format '{{.Size}}' "$image" | head -n 1)
echo "build-runtime: image $image: $size (without a model)"

if [ "$#" -lt 2 ]; then
    exit 0
fi
model="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
picture="$2"
echo "build-runtime: [4/4] serve $model inside the image and answer one /infer on 127.0.0.1:$port"
ctr=$(buildah $storage from "$image")
descendants() {  # the processes started under PID $1 (buildah run -> chroot helper -> the server)
    for child in $(ps -o pid= --ppid "$1"); do descendants "$child"; echo "$child"; done
}
stop_server() {  # SIGTERM to the server alone (the deepest process: a clean uvicorn shutdown); buildah run then returns
    pid=$(descendants "$server" | head -n 1)
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    buildah $storage rm "$ctr" >/dev/null 2>&1 || true
}
trap stop_server EXIT
buildah $storage run --isolation chroot -v "$model:/models/model.onnx:ro" \
    --env INSIGHTAD_HOST=127.0.0.1 --env INSIGHTAD_PORT="$port" "$ctr" -- \
    sh /opt/insightad/docker/entrypoint.sh --no-access-log &
server=$!
"$py" - "$port" "$picture" <<'PY'
import base64, json, sys, time, urllib.request
port, picture = sys.argv[1], sys.argv[2]
body = json.dumps({"image": base64.b64encode(open(picture, "rb").read()).decode()}).encode()
t0 = time.monotonic()
while time.monotonic() - t0 < 180:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            print("build-runtime: /infer answered", json.dumps(json.load(r)), f"({time.monotonic() - t0:.1f} s after start)")
            sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("build-runtime: no /infer answer within 180 s")
PY
