# Two entry points, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m earendil_py.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check earendil_py tests bench
	$(BIN)/ruff format --check earendil_py tests bench
	$(BIN)/mypy --strict earendil_py

bench: $(STAMP)
	$(BIN)/python bench/peel.py
	$(BIN)/python bench/link.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/accounting.py
	$(BIN)/python bench/hostile.py

clean:
	rm -rf $(VENV) demo-net
