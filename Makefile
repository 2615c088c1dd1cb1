# Two commands from a fresh clone:  `make repro` runs the pipeline, `make test` runs lint and the tests.
# Each installs what it needs: uv (with pip, if missing), then the locked environment
# (uv sync --frozen --compile-bytecode).
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: help uv sync chromium repro test test-fast lint format mlflow-ui clean

help:
	@echo "make repro      run the whole pipeline (dvc repro) on the embedded default"
	@echo "make test       ruff + the test suite (unit and integration); installs Chromium for the UI tests"
	@echo "make test-fast  ruff + the unit tests only (no services, about 2 minutes)"
	@echo "make mlflow-ui  browse runs and the registry at http://127.0.0.1:5000"

uv:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install --quiet uv

# --compile-bytecode: every process of a run (each stage, each Ray worker, dvc) imports torch, Ray and MLflow;
# without .pyc files (uv does not write them by default, and PYTHONDONTWRITEBYTECODE stops Python from doing it)
# each compiles their sources again, 2-3x the CPU of the import itself. Once per sync (~1 min), then ~2 s.
sync: uv
	$(UV) sync --frozen --compile-bytecode

# Headless Chromium for tests/test_ui.py (the MLflow UI as a user sees it), from apt when missing: as root, or
# through sudo. Without apt or either of those it only says so: the UI tests then skip (and fail under CI=true).
chromium:
	@[ -z "$$CHROMIUM" ] || exit 0; \
	for browser in chromium chromium-browser google-chrome google-chrome-stable; do \
		command -v $$browser >/dev/null 2>&1 && exit 0; done; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "chromium: missing, and neither root nor sudo to install it: the UI tests will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "chromium: missing, and no apt-get to install it: the UI tests will skip"; exit 0; fi; \
	echo "chromium: installing it (apt-get install chromium)"; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

repro: sync
	$(UV) run --frozen dvc repro

lint: sync
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

# Two pytest workers: one runs the tests on the session's Ray cluster, the other the rest, then those on the local
# stack (tests/conftest.py, GROUPS: xdist hands out work in the order collected). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: lint chromium
	$(UV) run --frozen pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test-fast: lint
	$(UV) run --frozen pytest -m "not integration"

format: sync
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

mlflow-ui: sync
	$(UV) run --frozen mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlruns.db mlartifacts
