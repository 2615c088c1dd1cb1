# Two commands from a fresh clone:  `make repro` runs the pipeline, `make test` runs lint and the tests.
# Each installs what it needs: uv (with pip, if missing), then the locked environment (uv sync --frozen).
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: help uv sync repro test lint format mlflow-ui clean

help:
	@echo "make repro      run the whole pipeline (dvc repro) on the embedded default"
	@echo "make test       ruff + the test suite (unit and integration)"
	@echo "make mlflow-ui  browse runs and the registry at http://127.0.0.1:5000"

uv:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install --quiet uv

sync: uv
	$(UV) sync --frozen

repro: sync
	$(UV) run --frozen dvc repro

lint: sync
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

test: lint
	$(UV) run --frozen pytest

format: sync
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

mlflow-ui: sync
	$(UV) run --frozen mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlruns.db mlartifacts
