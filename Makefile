# freeatten-lightning: `make help` lists the targets. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= configs/experiment/smoke.yaml
ARGS ?=
PYTEST_ARGS ?=
NODES ?= 1
GPUS_PER_NODE ?= 8
SUBMIT_ARGS ?=
CKPT ?=
OUT ?=
DATA ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install train submit convert-ckpt eval passkey reproduce test test-fast bench lint clean

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

submit: $(STAMP) ## queue CONFIG as a SLURM job on NODES x GPUS_PER_NODE (SUBMIT_ARGS='--time 24:00:00 --dry-run')
	$(BIN)/freeatten submit fit --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) --config $(CONFIG) $(SUBMIT_ARGS) -- $(ARGS)

convert-ckpt: $(STAMP) ## DeepSpeed checkpoint folder CKPT=... -> one fp32 file (OUT=..., default next to the run)
	$(BIN)/freeatten convert-ckpt $(CKPT) $(OUT)

eval: $(STAMP) ## loss at 1-16x the training length of CKPT="a.ckpt b.ckpt" side by side (ARGS='--stride 64')
	$(if $(CKPT),,$(error set CKPT=runs/smoke/checkpoints/last.ckpt (several, space-separated, to compare)))
	$(BIN)/freeatten eval-lengths $(foreach c,$(CKPT),--ckpt $(c)) $(ARGS)

passkey: $(STAMP) ## passkey retrieval of CKPT=... over lengths x depths, table + heatmap in runs/passkey/
	$(if $(CKPT),,$(error set CKPT=runs/smoke/checkpoints/last.ckpt))
	$(BIN)/freeatten passkey $(foreach c,$(CKPT),--ckpt $(c)) $(ARGS)

test: $(STAMP) ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests without the slow end-to-end CLI runs
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

reproduce: $(STAMP) ## the paper's comparison at laptop scale -> docs/results.md (resumable; DATA=shards, ARGS=...)
	$(BIN)/freeatten reproduce $(if $(DATA),--data-dir $(DATA)) $(ARGS)

bench: $(STAMP) ## CPU attention benchmark, N=1K..16K (ARGS='--lengths 1024 2048 --repeats 2'): benchmarks/results/
	$(BIN)/python benchmarks/bench_attention.py $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

clean: ## remove runs, caches and the virtual environment
	rm -rf runs lightning_logs .pytest_cache .ruff_cache $(VENV) *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
