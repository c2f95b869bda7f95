# syntax=docker/dockerfile:1.7
# Airflow 3 for the compose stack: the official image + the Docker/Kubernetes providers + the tasks
# package (no PyTorch), which the ingestion DAG and the `local` backend call, and the FAB auth manager
# (the production one the compose stack configures). The plugins are baked in for Kubernetes (the
# compose stack mounts dags/ and plugins/ over them, so edits need no rebuild). Hosts without a
# registry: images/compose/airflow.Dockerfile (same layout on the project's Debian base).
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}
ARG GIT_COMMIT=unknown
USER airflow
COPY --chown=airflow:root images/requirements/preprocess.txt /tmp/requirements.txt
RUN pip install --no-cache-dir apache-airflow==3.3.2 apache-airflow-providers-docker==4.6.1 \
        apache-airflow-providers-cncf-kubernetes==10.25.0 apache-airflow-providers-fab==3.10.2 \
        --constraint /tmp/requirements.txt
COPY --chown=airflow:root pyproject.toml README.md /opt/headavatar/src/
COPY --chown=airflow:root tasks/ /opt/headavatar/src/tasks/
COPY --chown=airflow:root config/ /opt/headavatar/config/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
RUN pip install --no-cache-dir --no-deps /opt/headavatar/src \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt
ENV HEADAVATAR_CONFIG_DIR=/opt/headavatar/config HEADAVATAR_GIT_COMMIT=${GIT_COMMIT}
