# The Celery broker of the multi-host stack (docker-compose.yml, profile `celery`): Debian's Redis 7.0,
# password-protected (REDIS_PASSWORD, written into a config file at start, never onto a command line),
# appendonly persistence in /data. Runs as the redis user.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY images/compose/redis-entrypoint.sh /usr/local/bin/redis-entrypoint
USER redis
EXPOSE 6379
VOLUME /data
ENTRYPOINT ["redis-entrypoint"]
