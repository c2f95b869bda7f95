# Airflow 3 for the compose stack where apache/airflow cannot be pulled: the same layout as the official
# image (AIRFLOW_HOME=/opt/airflow, user 50000 in group 0, `airflow <command>` entrypoint) on the project's
# Debian base, plus the FAB auth manager (the production one), the Docker/Kubernetes/Postgres providers
# and the tasks package. Build (repository root): infra/compose/build-local-images.sh
ARG BASE_IMAGE=headavatar/base:bookworm
FROM ${BASE_IMAGE}
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
COPY images/compose/airflow-constraints.txt /tmp/constraints.txt
COPY images/compose/pip-install.sh /usr/local/bin/pip-install
# The slow layer (Airflow and its providers), kept apart from the code so code edits do not redo it.
RUN python3 -m venv /opt/venv \
    && pip-install "apache-airflow[postgres]==3.3.2" apache-airflow-providers-fab==3.10.2 \
        apache-airflow-providers-docker==4.6.1 apache-airflow-providers-cncf-kubernetes==10.25.0 \
        --constraint /tmp/constraints.txt
# The tasks package's dependencies (from pyproject.toml, with an empty package), then the package itself.
COPY pyproject.toml README.md /opt/headavatar/src/
RUN mkdir -p /opt/headavatar/src/tasks/headavatar && touch /opt/headavatar/src/tasks/headavatar/__init__.py \
    && pip-install --constraint /tmp/constraints.txt /opt/headavatar/src
COPY tasks/ /opt/headavatar/src/tasks/
COPY config/ /opt/headavatar/config/
COPY --chown=50000:0 plugins/ /opt/airflow/plugins/
RUN pip-install --no-deps --force-reinstall /opt/headavatar/src && rm -rf /opt/headavatar/src/build
COPY images/compose/airflow-entrypoint.sh /usr/local/bin/airflow-entrypoint
# Declared late: a new commit must not invalidate the install layers above.
ARG GIT_COMMIT=unknown
ENV HEADAVATAR_CONFIG_DIR=/opt/headavatar/config HEADAVATAR_GIT_COMMIT=${GIT_COMMIT}
USER 50000:0
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["tini", "--", "airflow-entrypoint"]
CMD ["version"]
