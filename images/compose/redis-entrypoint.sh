#!/bin/bash
# Redis with the password from the environment in a private config file (a --requirepass argument would be
# visible to `ps` and `docker top`), listening on every interface of the container's network.
set -euo pipefail
: "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env (python3 infra/compose/new-env.py writes one)}"
conf=$(mktemp)
chmod 600 "$conf"
{
  echo "bind 0.0.0.0"
  echo "protected-mode no"
  echo "port 6379"
  echo "dir /data"
  echo "appendonly yes"
  echo "requirepass $REDIS_PASSWORD"
} > "$conf"
unset REDIS_PASSWORD
exec redis-server "$conf"
