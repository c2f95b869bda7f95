# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m headavatar.devserver.demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m headavatar.bench.extract_bench --out benchmarks/results

clean:
	rm -rf $(VENV) .headavatar .pytest_cache .ruff_cache
