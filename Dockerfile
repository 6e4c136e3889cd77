# canvas-serve image. Two targets, one recipe; they differ only in the torch wheel:
#   docker build -t canvas-serve:cpu .                       # default: the CPU target (last stage)
#   docker build --target cuda -t canvas-serve:cuda .
#   docker run -p 8000:8000 canvas-serve:cpu                 # serves the embedded Sudoku model
#   docker run --gpus all -p 8000:8000 -v /srv/model:/model:ro canvas-serve:cuda /model
# Arguments after the image name are `canvas-serve serve` arguments (flags mirror vLLM's);
# CANVAS_SERVE_* variables set the same settings. An API key is given at run time, never built in:
#   docker run -e CANVAS_SERVE_API_KEY -p 8000:8000 canvas-serve:cpu      # from the caller's environment
# (or --env-file, or a mounted secret file named by CANVAS_SERVE_API_KEY_FILE).
# Checked by `make deploy-check` (hadolint, a real build of the CPU target with podman,
# `canvas-serve --help` inside it): see deploy/README.md.

# Pinned bases. The CUDA target uses the same Python base: PyTorch's CUDA wheels carry their own CUDA
# libraries (nvidia-* wheels) and the NVIDIA container runtime mounts the driver (deploy/README.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TORCH_VERSION=2.13.0

# ---- base: the interpreter, the environment every stage shares --------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app

# ---- torch: one venv per target, torch installed first so no requirement can pull another build -----
FROM base AS torch-cpu
ARG TORCH_VERSION
# The CPU wheel index; the `+cpu` local version makes a CUDA build impossible to pick up.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu" \
    && python3 -c "import torch; assert torch.version.cuda is None, torch.__version__"

FROM base AS torch-cuda
ARG TORCH_VERSION
# torch 2.13 builds against CUDA 13.0 (driver >= 580); PyPI's default Linux wheel is the same build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cu130" \
    && python3 -c "import torch; assert torch.version.cuda, torch.__version__"

# ---- app: the project installed from its wheel, not editable -----------------------------------------
# The code, the embedded default model (models/sudoku, package data `service/embedded/sudoku`) and its
# LoRA adapter (models/sudoku-hard, `service/embedded/sudoku_hard`) land in the venv, which is all the
# runtime stages copy. Dependencies are installed first from pyproject.toml's
# list alone, so a source edit does not reinstall transformers and friends; `--no-deps` then installs
# the project. Without models/sudoku (an empty folder keeps the wheel buildable) the server says so and
# asks for a model directory; without the adapter it serves the base model alone. chmod: a working tree's weights may be 0600 (safetensors writes them so).
FROM base AS project
COPY pyproject.toml README.md ./
COPY engine engine
COPY service service
COPY models models
RUN mkdir -p models/sudoku models/sudoku-hard && chmod -R a+rX /app

FROM base AS requirements
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > requirements.txt

FROM torch-cpu AS app-cpu
COPY --from=requirements /app/requirements.txt ./
RUN pip install -r requirements.txt
COPY --from=project /app /src
RUN pip install --no-deps /src

FROM torch-cuda AS app-cuda
COPY --from=requirements /app/requirements.txt ./
RUN pip install -r requirements.txt
COPY --from=project /app /src
RUN pip install --no-deps /src

# ---- runtime: non-root user, health check, entrypoint -----------------------------------------------
FROM base AS runtime
# tcmalloc: on the CPU the engine core processes start with it (`--cpu-allocator auto`,
# engine/cpu_allocator.py), so a step does not fault its large tensors' pages in again.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libtcmalloc-minimal4=2.10-1 \
    && rm -rf /var/lib/apt/lists/*
# UID 10001, group 0 with group-writable home, so OpenShift's arbitrary UIDs work as well.
RUN useradd --uid 10001 --gid 0 --home-dir /home/canvas --create-home --shell /usr/sbin/nologin canvas \
    && chmod 0775 /home/canvas
# Mount your own model read-only anywhere (`-v /srv/model:/model:ro`, readable by UID 10001 or group 0)
# and pass its path.
ENV HOME=/home/canvas \
    CANVAS_SERVE_HOST=0.0.0.0 \
    CANVAS_SERVE_PORT=8000
EXPOSE 8000
# Liveness only: /health is 200 while the engine loop lives (readiness, /ready, is the orchestrator's).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CANVAS_SERVE_PORT', '8000') + '/health', timeout=4)"]
USER 10001
ENTRYPOINT ["canvas-serve", "serve"]
CMD []

FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=app-cuda /opt/venv /opt/venv

# The default target comes last.
FROM runtime AS cpu
COPY --from=app-cpu /opt/venv /opt/venv
