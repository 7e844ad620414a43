# Fermata — the two entry points are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck crds cluster-bin clean

# Python environment: the operator, the trainer (torch + audiocraft) and the dev tools.
# audiocraft 1.3.0 pins torch 2.1, so it and xformers are installed with --no-deps on top of
# their real runtime dependencies (listed in pyproject's `trainer` extra).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[trainer,dev]'
	$(BIN)/pip install -q --no-deps audiocraft==1.3.0 xformers==0.0.35
	touch $@

venv: $(STAMP)
