# The few commands people type. CI (.ci/run) calls the same targets the README shows.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format bench clean

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
	$(VENV)/bin/ruff check engine service tests bench
	$(VENV)/bin/ruff format --check engine service tests bench
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format engine service tests bench
	$(VENV)/bin/ruff check --fix engine service tests bench

bench: setup
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
