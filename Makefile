# Every target creates .venv when missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision lie on this machine's disk as a matched pair (see shared DESIGN.md)
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e ".[test,lint]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m pipeline.demo $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest -q --durations=15

# ruff (lint, then formatting) and mypy, as configured in pyproject.toml
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# make bench DEVICE=cuda: the GPU figures alone (benchmarks/run.py)
DEVICE ?= cpu
bench: setup
	$(BIN)/python -m benchmarks.run --device $(DEVICE)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
