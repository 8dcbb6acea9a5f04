# Two entry points (README): `make run` (paper profile) and `make test` (the test suite).
# Both create .venv if missing and install the pinned dependencies from pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: setup run quick test bench report lint

setup: $(STAMP)

# Reinstall whenever the pins change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Paper profile: every configuration of config/config.yaml, then tables and figures.
run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --keep-going --rerun-incomplete

# Quick profile: the same DAG on a few hundred images, written under quick/.
quick: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --keep-going --rerun-incomplete \
		--configfile config/quick.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_taylor.py
	$(BIN)/python benchmarks/bench_overhead.py

# One self-contained HTML file of the paper profile's figures and tables.
report: $(STAMP)
	$(BIN)/snakemake --report report.html

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
