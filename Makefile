# Two commands on a fresh machine:  `make demo` (the quickstart sweep on a local Ray, then its report) and `make test`
# (lint and the whole test suite). Both create .venv if missing and install ltc into it first.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# torch is installed first, pinned: 2.13.0's CPU build lies on disk on ltc's CI and dev machines.
# GPU machines: make TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see README).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

# Data: $LTC_DATA_HOME, else ../shared/data when it exists, else the user cache folder.
LTC_DATA_HOME ?= $(if $(wildcard ../shared/data/SOURCES.md),$(abspath ../shared/data),$(HOME)/.cache/ltc/data)
export LTC_DATA_HOME

.PHONY: install demo test lint format bench bench-search bench-targets reproduce reproduce-matbench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(TORCH_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

# The quickstart sweep on a local Ray, then its report; --resume makes a second run reuse what is done.
demo: install
	@echo "data home: $(LTC_DATA_HOME)"
	$(BIN)/ltc sweep sweeps/quickstart.yaml --results results --resume
	$(BIN)/ltc report results/quickstart

test: install lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check ltc tests benchmarks reproduce
	$(BIN)/ruff format --check ltc tests benchmarks reproduce

format: install
	$(BIN)/ruff check --fix ltc tests benchmarks reproduce
	$(BIN)/ruff format ltc tests benchmarks reproduce

bench: install
	$(BIN)/python benchmarks/bench_cli.py
	$(BIN)/python benchmarks/bench_graphs.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_driver.py
	$(BIN)/python benchmarks/bench_nodes.py

# The search benchmarks train ~1,500 models (about 40 minutes on 2 cores): not part of `make bench`.
bench-search: install
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_early_stop.py

# Target transforms per built-in dataset, by inner K-fold on training data (about 30 minutes on 2 cores).
bench-targets: install
	$(BIN)/python benchmarks/bench_targets.py

# The papers at laptop scale, and CHGNet as a start for L96 (about 11, 16 and 7 minutes on 2 cores; not part
# of CI): each sweep, its report, and a copy with the papers' numbers beside ltc's in results/reference/<name>/
# (committed). --resume: a rerun after an interrupt finishes what is left; remove results/<name>/ to start over.
REPRODUCE ?= paraisite_laptop devi_laptop chgnet_l96

reproduce: install
	@set -e; for name in $(REPRODUCE); do \
	  start=$$(date +%s); \
	  $(BIN)/ltc sweep sweeps/$$name.yaml --results results --resume; \
	  wall=$$(( $$(date +%s) - start )); echo "$$name: $$wall s"; \
	  $(BIN)/ltc report results/$$name; \
	  $(BIN)/python reproduce/paper_tables.py $$name results/$$name results/reference/$$name --wall-seconds $$wall; \
	done

# Matbench as a public check (about 12 minutes on 2 cores): CGCNN with ltc's defaults on matbench_phonons' official
# v0.1 folds, epochs kept by validation MAE (the leaderboard's metric); cv.json holds each fold's MAE.
reproduce-matbench: install
	$(BIN)/ltc train --dataset ph --model cgcnn --split matbench --select-by mae --out results/matbench_phonons_cgcnn -q
	mkdir -p results/reference/matbench_phonons_cgcnn
	cp results/matbench_phonons_cgcnn/cv.json results/reference/matbench_phonons_cgcnn/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
