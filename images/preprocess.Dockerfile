# CPU image: stages 1-2 (extract, sample) and ingestion (unpack). No PyTorch: those never import it.
# Build from the repository root with `make images`. The base is a build argument: the public
# python:3.11 slim image where a registry answers, else the project's own Debian bookworm image
# (images/base/build.sh). Same file on both; the classic builder and BuildKit both build it.
# Layers: dependencies (change with `make lock`) before the code (changes every commit), so a
# code-only change rebuilds two small layers in seconds; the commit is recorded last.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# The host's locally added CAs (images/ca/, e.g. a TLS-inspecting proxy's), for pip in this stage only.
COPY images/ca/ /usr/local/share/ca-certificates/
RUN if command -v update-ca-certificates >/dev/null; then update-ca-certificates >/dev/null; fi
COPY images/requirements/preprocess.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install setuptools==84.2.1 --requirement /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HEADAVATAR_CONFIG_DIR=/opt/headavatar/config HEADAVATAR_SCRATCH=/scratch
# /scratch: a declared volume (stage 1's decoded frames), not the container's writable layer.
RUN groupadd --gid 10001 headavatar && useradd --uid 10001 --gid 10001 --create-home headavatar \
    && mkdir /scratch && chown 10001:10001 /scratch
VOLUME /scratch
COPY --from=deps /opt/venv /opt/venv
COPY config/ /opt/headavatar/config/
COPY pyproject.toml README.md /opt/headavatar/src/
COPY tasks/ /opt/headavatar/src/tasks/
RUN pip install --no-deps --no-build-isolation --no-compile /opt/headavatar/src \
    && rm -rf /opt/headavatar/src/build && headavatar stages
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="headavatar-preprocess" \
      org.opencontainers.image.description="NeRSemble -> Gaussian Head Avatar: stages 1-2 and ingestion" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV HEADAVATAR_GIT_COMMIT=${GIT_COMMIT}
USER 10001:10001
WORKDIR /home/headavatar
ENTRYPOINT ["headavatar"]
CMD ["--help"]
