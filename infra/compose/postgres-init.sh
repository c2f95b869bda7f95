#!/bin/bash
# First start of the database volume: a separate database and role for MLflow's backend store. The password
# goes in as a psql variable (:'pw' quotes it as an SQL literal), never spliced into the SQL text.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -v pw="$MLFLOW_DB_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
