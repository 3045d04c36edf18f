# idrecog: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help install run test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# versions come from pyproject.toml's ranges (torch and torchvision included)
	$(BIN)/pip install -e ".[dev,text,serve,export,stream]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install idrecog with every extra

run: install ## train the unified model on the synthetic benchmark (generated on first use), print the table, draw samples
	$(BIN)/idrecog fit --config lightning_configs/unified.yaml
	$(BIN)/idrecog data show data/synthetic --split val --n 16 --out runs/unified/synthetic_samples.png

test: install ## run the test suite (what CI runs)
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: install ## the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: install ## ruff lint and format check
	$(BIN)/ruff check idrecog tests benchmarks
	$(BIN)/ruff format --check idrecog tests benchmarks

format: install ## ruff format and autofix
	$(BIN)/ruff format idrecog tests benchmarks
	$(BIN)/ruff check --fix idrecog tests benchmarks

bench: install ## run the CPU benchmarks and print their ratios
	$(BIN)/python -m benchmarks.run_all

clean: ## remove the venv, caches and generated outputs
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info data runs outputs lightning_logs wandb
