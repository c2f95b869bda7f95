# Airflow 3 for the compose stack and the Helm chart: the official image's layout (AIRFLOW_HOME=/opt/airflow,
# user 50000 in group 0, `airflow <command>` entrypoint) on a Debian Python 3.11 base, with the FAB auth
# manager (the production one), the Docker/Kubernetes/Postgres providers, the tasks package (no PyTorch:
# the ingestion DAG and the `local` backend call it) and the plugins (the compose stack mounts dags/ and
# plugins/ over them, so edits need no rebuild). PYTHON_IMAGE: the public python image, or the project's
# own Debian image where no registry answers (images/base/build.sh). Build: `make images-compose`.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# PEM text of extra CA certificates pip must trust during the build (TLS-inspecting proxies); not kept.
ARG EXTRA_CA_CERT=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 50000 --gid 0 --home-dir /home/airflow --create-home airflow \
    && mkdir -p /opt/airflow/dags /opt/airflow/plugins /opt/airflow/logs \
    && chown -R 50000:0 /opt/airflow && chmod -R g+rwX /opt/airflow
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH AIRFLOW_HOME=/opt/airflow PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY images/requirements/airflow-constraints.txt /tmp/constraints.txt
COPY images/compose/pip-install.sh /usr/local/bin/pip-install
# The slow layer (Airflow and its providers), kept apart from the code so code edits do not redo it.
RUN python3 -m venv /opt/venv \
    && pip-install "apache-airflow[postgres]==3.3.2" apache-airflow-providers-fab==3.10.2 \
        apache-airflow-providers-docker==4.6.1 apache-airflow-providers-cncf-kubernetes==10.25.0 \
        apache-airflow-providers-celery==3.26.0 \
        --constraint /tmp/constraints.txt
# The tasks package's dependencies (from pyproject.toml, with an empty package), then the package itself. The
# empty package's build tree goes with it: setuptools would otherwise keep its empty __init__.py (newer than the
# copied sources) in the real package, and `headavatar` (ingestion's pending list) would not start.
COPY pyproject.toml README.md /opt/headavatar/src/
RUN mkdir -p /opt/headavatar/src/tasks/headavatar && touch /opt/headavatar/src/tasks/headavatar/__init__.py \
    && pip-install --constraint /tmp/constraints.txt /opt/headavatar/src \
    && rm -rf /opt/headavatar/src/build /opt/headavatar/src/tasks
COPY tasks/ /opt/headavatar/src/tasks/
COPY config/ /opt/headavatar/config/
COPY --chown=50000:0 plugins/ /opt/airflow/plugins/
RUN pip-install --no-deps --force-reinstall /opt/headavatar/src && rm -rf /opt/headavatar/src/build \
    && headavatar --version
COPY images/airflow-entrypoint.sh /usr/local/bin/airflow-entrypoint
# The official image's paths that the Airflow Helm chart calls: its probes (`/entrypoint airflow jobs check`)
# and its log-groomer sidecar (`bash /clean-logs`).
COPY images/airflow-clean-logs.sh /clean-logs
RUN ln -s /usr/local/bin/airflow-entrypoint /entrypoint
# Declared late: a new commit must not invalidate the install layers above.
ARG GIT_COMMIT=unknown
ENV HEADAVATAR_CONFIG_DIR=/opt/headavatar/config HEADAVATAR_GIT_COMMIT=${GIT_COMMIT}
USER 50000:0
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["tini", "--", "airflow-entrypoint"]
CMD ["version"]
