# The compose stack's Docker API proxy: Debian's HAProxy with the switches of tecnativa/docker-socket-proxy
# (CONTAINERS, IMAGES, POST, INFO, VERSION, EXEC, ...; 1 allows, 0 denies) in front of the socket mounted at
# /var/run/docker.sock. Runs as haproxy; give it the socket's group (compose: group_add).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/*
COPY images/compose/docker-proxy.cfg /etc/haproxy/docker-proxy.cfg
ENV CONTAINERS=0 IMAGES=0 POST=0 INFO=0 VERSION=1 PING=1 EXEC=0 VOLUMES=0 NETWORKS=0
USER haproxy
EXPOSE 2375
ENTRYPOINT ["haproxy", "-db", "-f", "/etc/haproxy/docker-proxy.cfg"]
