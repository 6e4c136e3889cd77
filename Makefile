# The few commands people type. CI (.ci/run) calls the same targets the README shows.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format bench serve clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel, so no requirement can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check engine service tests bench recipes
	$(VENV)/bin/ruff format --check engine service tests bench recipes
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format engine service tests bench recipes
	$(VENV)/bin/ruff check --fix engine service tests bench recipes

bench: setup
	$(PY) bench/forward.py

serve: setup
	$(VENV)/bin/canvas-serve serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# ---- deployment (Dockerfile, docker-compose.yml, deploy/): see deploy/README.md ----------------------
DEPLOY_VENV ?= .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
APT_TOOLS := docker-compose:docker-compose promtool:prometheus

.PHONY: deploy-tools deploy-check-fast deploy-check image-check

deploy-tools: $(DEPLOY_STAMP)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for t in $(APT_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	  if [ -n "$$missing" ]; then \
	    apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "deploy-tools: not root with apt-get: install docker-compose and prometheus (promtool) yourself"; fi

$(DEPLOY_STAMP): deploy/requirements-tools.txt
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q -r deploy/requirements-tools.txt
	touch $(DEPLOY_STAMP)

# Static checks of every deploy file, the dashboard against a live /metrics, the scale-out test.
# DEPLOY_CHECK_STRICT=1: a missing tool fails instead of skipping.
deploy-check-fast: setup deploy-tools
	DEPLOY_CHECK_STRICT=1 $(PY) -m pytest -q tests/deploy

# Everything, including a real image build (minutes): its output is recorded in deploy/README.md.
deploy-check: deploy-check-fast image-check

image-check:
	bash deploy/image-check.sh
