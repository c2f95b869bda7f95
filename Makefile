# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
#
# Images (docs/containers.md), tag $(IMAGE_TAG) = 0.1.0:
#   headavatar/preprocess:0.1.0  stages 1-2 + ingestion (images/preprocess.Dockerfile)       make images
#   headavatar/cpu:0.1.0         stages 3-6 on CPU (images/cuda.Dockerfile, CPU build args)   make images
#   headavatar/cuda:0.1.0        stages 3-6 on CUDA (images/cuda.Dockerfile, CUDA build args) make images-cuda
#   headavatar/base:bookworm     Debian bookworm + Python 3.11 from Debian packages, the base where no
#                                registry answers (images/base/build.sh, cached by recipe)   make image-base
#   the compose stack's images   the build: sections of infra/compose/docker-compose.yml      make images-compose
# BASE=auto|public|local picks the Python base of `make images` (auto: public where a registry answers).
# The Docker engine: `make docker-engine` installs Debian's docker.io (root + apt-get) and starts the
# project's own dockerd (data under .headavatar/docker; DOCKER_HOST=$(DOCKER_HOST)).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' images/requirements/torch.txt)
AV_VERSION ?= $(shell sed -n 's/^av==//p' images/requirements/preprocess.txt)
BACKEND ?= docker
BASE ?= auto
DOCKER_HOST ?= unix://$(CURDIR)/.headavatar/docker/run/docker.sock
export DOCKER_HOST BASE BACKEND

.PHONY: install jod tools demo demo-ui test test-fast lint bench images images-compose images-cuda smoke-cuda image-base docker-install docker-engine \
	docker-engine-stop lock clean

install: $(VENV)/.installed

# pip through heartbeat.py: a line at least every 20 s (what is collected, the install step) instead of minutes of -q.
HEARTBEAT = $(PYTHON) tasks/headavatar/devserver/heartbeat.py
PIP = $(PY) -m pip install --progress-bar off
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "install: pip, then torch $(TORCH_VERSION), then the project with its dependencies (about 2 min)"
	@$(HEARTBEAT) --label "install 1/3 pip" -- $(PIP) --upgrade pip
	@$(HEARTBEAT) --label "install 2/3 torch" -- $(PIP) torch==$(TORCH_VERSION)
	@$(HEARTBEAT) --label "install 3/3 project" -- $(PIP) -e ".[dev]"
	@# PyAV's wheels bundle FFmpeg and x264, so another release encodes other bytes: the videos stage 6 writes here
	@# must be the images' (images/requirements/preprocess.txt), or a local run's avatar differs from a container's.
	@$(PIP) -q av==$(AV_VERSION)
	@# The NeRSemble benchmark toolkit (Apache-2.0), only its constants and source for the tests to check the
	@# submission against: its own dependencies (open3d, a CUDA torch) are not wanted here, so none is installed.
	@$(PIP) -q --no-deps nersemble-benchmark==0.2.0
	touch $@

# The JOD environment (tasks/headavatar/jod.py): ColorVideoVDP needs torchvision, which cannot share the
# project's CPU torch, so it gets its own venv, pinned by images/requirements/jod.txt (about 6 GB, 2 min).
JOD_VENV ?= .venv-jod
jod: $(JOD_VENV)/.installed
$(JOD_VENV)/.installed: images/requirements/jod.txt
	$(PYTHON) -m venv $(JOD_VENV)
	@$(HEARTBEAT) --label "jod environment" -- $(JOD_VENV)/bin/python -m pip install --progress-bar off \
	  -r images/requirements/jod.txt
	touch $@

# BACKEND=docker (default): every task a container; the engine and images are set up on first use.
# BACKEND=local: the same commands as subprocesses of Airflow, no Docker.
demo: install $(if $(filter docker,$(BACKEND)),docker-install)
	$(PY) -m headavatar.devserver.demo --backend $(BACKEND)

# The Airflow UI (api-server, scheduler, dag-processor, triggerer) beside the demo's S3 and MLflow, until Ctrl-C.
demo-ui: install
	$(PY) -m headavatar.devserver.airflow_ui

# Debian packages the lint and the tests use: docker-compose (v1; validates infra/compose, runs the compose
# test), chromium (the UI tests drive it through Playwright) and npm (the avatar page's script is rebuilt
# from its lock file by tests/test_web_viewer.py). Installed where apt-get is usable as root.
tools:
	@{ command -v docker-compose >/dev/null && command -v chromium >/dev/null && command -v npm >/dev/null; } \
	  || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose chromium \
	     $$(command -v npm >/dev/null || echo npm) >/dev/null; } \
	  || { echo "docker-compose, chromium or npm missing: install Debian's docker-compose, chromium and npm" >&2; \
	       exit 1; }

lint: install tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint --config .hadolint.yaml images/*.Dockerfile images/compose/*.Dockerfile
	docker-compose -f infra/compose/docker-compose.yml --env-file infra/compose/.env.example config -q
	$(VENV)/bin/helm lint --strict infra/k8s/headavatar

# Everything: ruff, then the whole suite, whose tests run the other linters (tests/test_infra.py), build
# the docs (tests/test_docs.py), the images, Airflow, the compose stack and the browser. Under CI (CI=true)
# the test gate (tests/gate.py) fails the run for any test that did not run. PYTEST_ARGS adds options,
# e.g. PYTEST_ARGS='--durations=30'; narrowing the run (-m, -k, paths) is for work outside the gate.
PYTEST_ARGS ?=
test: install tools docker-install jod
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick loop while editing: ruff + the tests not marked slow (no Docker, Airflow, browser or
# training; tests/gate.py marks those using such fixtures). A few minutes; `make test` before pushing.
test-fast: install tools jod
	$(VENV)/bin/ruff check .
	HEADAVATAR_TEST_GATE=0 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The docs site (mkdocs.yml, docs/): warnings are errors; tables and the config reference are generated.
.PHONY: docs
docs: install
	$(PY) -m headavatar.config_reference --check
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: install
	$(PY) -m headavatar.bench.extract_bench --repeat 3 --out benchmarks/results

# Debian's docker.io (engine + CLI) and mmdebstrap (the local base image) where apt-get is usable as root.
docker-install:
	@{ command -v dockerd >/dev/null && command -v docker >/dev/null && command -v mmdebstrap >/dev/null; } || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io mmdebstrap \
	       >/dev/null; } || { echo "Docker missing: install Debian's docker.io and mmdebstrap" >&2; exit 1; }

# Starts the project's dockerd unless one answers at DOCKER_HOST; `make docker-engine-stop` stops it by PID.
docker-engine: install docker-install
	$(PY) -m headavatar.devserver.docker_engine start

docker-engine-stop: install
	$(PY) -m headavatar.devserver.docker_engine stop

image-base: docker-engine
	images/base/build.sh

# The stage images the docker backend runs on a CPU machine (demo, tests, CI). GIT_COMMIT (HEAD) is
# recorded in the images' label and environment, and with it in every MLflow run they log.
IMAGE_TAG ?= 0.1.0
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
images: docker-engine
	$(PY) -m headavatar.devserver.images --tag $(IMAGE_TAG) --base $(BASE)

# The compose stack's images (postgres, s3, docker-proxy, mlflow, airflow), from the compose file's build: sections.
images-compose: docker-engine
	$(PY) -m headavatar.devserver.compose_images --base $(BASE)

# The CUDA stage image on the project's Python base (no registry): PyPI's CUDA torch of torch-cuda.txt, gsplat's
# kernels compiled with NVIDIA's compiler wheels for CUDA_ARCHS (docs/containers.md: size, build time).
CUDA_ARCHS ?= 8.0;8.6;8.9;9.0
images-cuda: docker-engine
	$(PY) -m headavatar.devserver.images --cuda --tag $(IMAGE_TAG) --base $(BASE) --arch-list "$(CUDA_ARCHS)"

# That image on this CPU: gsplat's kernels load, and the demo DAG runs stages 3-6 in it (docs/containers.md).
smoke-cuda: docker-engine
	$(PY) -m headavatar.devserver.cuda_smoke --image headavatar/cuda:$(IMAGE_TAG)

# Re-pin images/requirements/preprocess.txt from pyproject.toml's core dependencies.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install -q .
	{ echo "# Pinned by: make lock (pip install . && pip freeze; Python 3.11, Linux x86_64)"; \
	  .lockvenv/bin/pip freeze --exclude headavatar; } > images/requirements/preprocess.txt
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) $(JOD_VENV) .headavatar .pytest_cache .ruff_cache
