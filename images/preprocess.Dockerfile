# syntax=docker/dockerfile:1.7
# CPU image: stages 1-2 (extract, sample) and ingestion. No PyTorch: those stages never import it.
# Build from the repository root:  make images  (or docker build -f images/preprocess.Dockerfile .)
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY images/requirements/preprocess.txt /tmp/requirements.txt
# Dependencies first (a layer that survives code changes), exactly as locked.
RUN /opt/venv/bin/pip install --requirement /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY tasks/ tasks/
RUN /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/headavatar stages

FROM ${PYTHON_IMAGE}
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="headavatar-preprocess" \
      org.opencontainers.image.description="NeRSemble -> Gaussian Head Avatar: stages 1-2 and ingestion" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
RUN groupadd --gid 10001 headavatar && useradd --uid 10001 --gid 10001 --create-home headavatar
COPY --from=build /opt/venv /opt/venv
COPY config/ /opt/headavatar/config/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HEADAVATAR_CONFIG_DIR=/opt/headavatar/config \
    HEADAVATAR_GIT_COMMIT=${GIT_COMMIT} HEADAVATAR_SCRATCH=/tmp
USER 10001:10001
WORKDIR /home/headavatar
ENTRYPOINT ["headavatar"]
CMD ["--help"]
