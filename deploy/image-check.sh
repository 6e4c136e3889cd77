#!/usr/bin/env bash
# A real build of the Dockerfile's CPU target without a Docker daemon, then `canvas-serve --help` and a
# few facts checked inside the built image. Run by `make image-check`; its last output is recorded in
# deploy/README.md ("Image check").
#
# How: podman/buildah with chroot isolation (no daemon, no cgroups needed). The official base,
# python:3.11.14-slim-bookworm, cannot be pulled here, so a stand-in is made with debootstrap (Debian
# bookworm minbase + python3, the same Debian release; not byte-identical) and passed as PYTHON_IMAGE.
# The torch CPU wheel comes from the machine's wheel folder when it has one (PIP_FIND_LINKS), else from
# the Dockerfile's default index; everything else from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${IMAGE_CHECK_DIR:-artifacts/image-check}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/canvas-serve-base:bookworm-py3
IMAGE=localhost/canvas-serve:check
WHEELS=${TORCH_WHEELS:-/opt/wheels}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)

step() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }
need() {
    command -v "$1" >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q --no-install-recommends podman buildah debootstrap >/dev/null
    else
        echo "image-check: needs $1 (apt-get install podman buildah debootstrap)" >&2
        exit 2
    fi
}
need podman
need buildah
need debootstrap
mkdir -p "$WORK"
start=$(date +%s)

if ! podman image exists "$BASE"; then
    step "stand-in base: debootstrap bookworm minbase + python3"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

build_args=(--build-arg "PYTHON_IMAGE=$BASE")
# The host's CA bundle and a pip.conf that uses it, for networks whose TLS proxy has its own CA
# (mounted for the build only: nothing of it lands in the image).
CA=/etc/ssl/certs/ca-certificates.crt
printf '[global]\ncert = %s\n' "$CA" >"$WORK/pip.conf"
volumes=(-v "$CA:$CA:ro" -v "$PWD/$WORK/pip.conf:/etc/pip.conf:ro")
if ls "$WHEELS"/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    build_args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg "PIP_FIND_LINKS=$WHEELS")
    volumes+=(-v "$WHEELS:$WHEELS:ro")
fi

step "podman build --target cpu"
podman build --isolation=chroot --network=host --pull=never --format docker --layers \
    "${volumes[@]}" "${build_args[@]}" --target cpu -t "$IMAGE" . >"$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log"
    exit 1
}
grep -E '^(STEP|COMMIT|Successfully)' "$WORK/build.log" | tail -4

step "inside the image"
container=$(buildah from --pull-never "$IMAGE")
trap 'buildah rm "$container" >/dev/null' EXIT
run() { buildah run --isolation chroot --user 10001 "$container" -- "$@"; }
run canvas-serve --help
run canvas-serve serve --help | head -3
run python3 -c "import torch; assert torch.version.cuda is None; print('torch', torch.__version__, 'CPU only')"
run python3 -c "import service.model_setup as m; print('default model dir', m.DEFAULT_MODEL_DIR)"
run id

# The embedded model when models/ has it; else the fallback message, then a tiny checkpoint (made by
# the tests' helper) mounted read-only, as users mount theirs.
serve_args=()
mount=()
if [ ! -f models/sudoku/config.json ]; then
    step "no model given, none embedded: the message"
    run canvas-serve serve 2>&1 | grep '^canvas-serve:' || true
    rm -rf "$WORK/tiny"
    .venv/bin/python -c "import sys; from pathlib import Path; from tests.engine.checkpoints import \
save_reference, save_tokenizer; p = Path(sys.argv[1]); save_reference(p); save_tokenizer(p)" \
        "$WORK/tiny" >/dev/null 2>&1
    chmod -R a+rX "$WORK/tiny"  # safetensors writes 0600; the image's user is not root
    serve_args=(/model --served-model-name tiny)
    mount=(-v "$PWD/$WORK/tiny:/model:ro")
fi
step "serve ${serve_args[*]:-the embedded model}; probe with the image's HEALTHCHECK command"
health=$(podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck.Test}}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)[-1])')
buildah run --isolation chroot "${mount[@]}" "$container" -- env CANVAS_SERVE_PORT=18765 \
    timeout 120 canvas-serve serve "${serve_args[@]}" --log-level warning >"$WORK/serve.log" 2>&1 &
server=$!
healthy=no
for _ in $(seq 150); do
    kill -0 "$server" 2>/dev/null || break
    if run env CANVAS_SERVE_PORT=18765 python3 -c "$health" 2>/dev/null; then
        healthy=yes
        break
    fi
    sleep 1
done
echo "HEALTHCHECK: $healthy"
if [ "$healthy" = yes ]; then
    python3 - <<'PY'
import json, urllib.request
models = json.load(urllib.request.urlopen("http://127.0.0.1:18765/v1/models"))["data"]
body = json.dumps({"model": models[0]["id"], "prompt": "hi", "max_tokens": 16}).encode()
request = urllib.request.Request("http://127.0.0.1:18765/v1/completions", body, {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=120))
print("completion from the image:", models[0]["id"], answer["choices"][0]["finish_reason"], answer["usage"])
PY
fi
# With chroot isolation the server is a host process that outlives `buildah run`: stop it by its PID.
pids=$(ss -ltnpH "sport = :18765" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
[ -z "$pids" ] || kill $pids 2>/dev/null || true
wait "$server" 2>/dev/null || true
[ "$healthy" = yes ] || { tail -5 "$WORK/serve.log"; exit 1; }

step "image config"
podman image inspect "$IMAGE" --format \
    'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}} ports={{.Config.ExposedPorts}}'
podman image inspect "$IMAGE" --format 'healthcheck={{.Config.Healthcheck.Test}}'
podman image inspect "$IMAGE" --format 'size={{.Size}}' | awk -F= '{printf "size=%.0f MB\n", $2/1e6}'
echo "image-check: OK in $(($(date +%s) - start)) s"
