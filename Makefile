# Two entry points, each doing its own set-up: `make demo` and `make test`.
# `make demo` (and `make bench`) install only what the node runs; `make test` (and
# `make lint`) add the test and lint tools. Each install has its own stamp.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

# The test install includes the runtime one.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(RUNTIME)

demo: $(RUNTIME)
	$(BIN)/python -m earendil_py.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check earendil_py tests bench
	$(BIN)/ruff format --check earendil_py tests bench
	$(BIN)/mypy --strict earendil_py

# Every bench script, its output as it comes, then one table of the figures with a target
# (bench/summary.py); docs/benchmarks.md says what each measures and the latest figures.
BENCHES := peel link relay accounting hostile apps links latency network

bench: $(RUNTIME)
	$(BIN)/python bench/summary.py $(BENCHES:%=bench/%.py)

clean:
	rm -rf $(VENV) demo-net
