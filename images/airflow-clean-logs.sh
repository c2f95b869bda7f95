#!/bin/bash
# The log groomer the official Airflow Helm chart runs as a sidecar (`bash /clean-logs`): deletes task logs
# older than AIRFLOW__LOG_RETENTION_DAYS (default 15) under AIRFLOW_HOME/logs, every
# AIRFLOW__LOG_CLEANUP_FREQUENCY_MINUTES (default 15), until the container is stopped.
set -euo pipefail
days=${AIRFLOW__LOG_RETENTION_DAYS:-15}
every=${AIRFLOW__LOG_CLEANUP_FREQUENCY_MINUTES:-15}
logs=${AIRFLOW_HOME:-/opt/airflow}/logs
while true; do
  find "$logs" -type f -name '*.log' -mtime +"$days" -delete 2>/dev/null || echo "clean-logs: find in $logs failed" >&2
  find "$logs" -mindepth 1 -type d -empty -delete 2>/dev/null || echo "clean-logs: removing empty folders failed" >&2
  sleep "$((every * 60))"
done
