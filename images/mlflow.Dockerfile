# syntax=docker/dockerfile:1.7
# The MLflow tracking server for the compose stack: PostgreSQL backend store, artifacts proxied to S3.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.10 boto3==1.44.5 \
    && groupadd --gid 10002 mlflow && useradd --uid 10002 --gid 10002 --create-home mlflow
USER 10002:10002
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
