# freeatten-lightning: `make help` lists the targets. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= configs/experiment/smoke.yaml
ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS='...' (CLI overrides) TORCH='$(TORCH)' VENV=$(VENV)"

install: $(STAMP) ## create $(VENV) and install the package (torch pinned first, then the rest)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bpe]"
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.15"
	touch $@

train: $(STAMP) ## train on CONFIG (default: a nano LSSAR model on the embedded corpus, a few CPU minutes)
	$(BIN)/freeatten fit --config $(CONFIG) $(ARGS)

test: $(STAMP) ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests without the slow end-to-end CLI runs
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

clean: ## remove runs, caches and the virtual environment
	rm -rf runs lightning_logs .pytest_cache .ruff_cache $(VENV) *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
