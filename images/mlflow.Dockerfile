# syntax=docker/dockerfile:1.7
# The MLflow tracking server for the compose stack: PostgreSQL backend store, artifacts proxied to S3, and the
# basic-auth app (`--app-name basic-auth`; admin from MLFLOW_AUTH_ADMIN_* at run time, users in /var/lib/mlflow-auth).
# PYTHON_IMAGE: any Debian Python 3.11 image with venv, e.g. the project's own (images/base/build.sh, no registry).
# The compose stack's s3-init and mlflow-init steps run in this image too (boto3, the standard library).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# PEM text of extra CA certificates pip must trust during the build (TLS-inspecting proxies); not kept.
ARG EXTRA_CA_CERT=""
COPY images/compose/pip-install.sh /usr/local/bin/pip-install
RUN python3 -m venv /opt/venv \
    && pip-install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary==2.9.10 boto3==1.44.5 \
    && groupadd --gid 10002 mlflow && useradd --uid 10002 --gid 10002 --create-home mlflow \
    && mkdir -p /var/lib/mlflow-auth && chown 10002:10002 /var/lib/mlflow-auth
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10002:10002
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
