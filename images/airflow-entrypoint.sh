#!/bin/sh
# `docker run IMAGE scheduler` runs `airflow scheduler`, as in the official image; a shell or python
# command (the compose stack's airflow-init) runs as given.
case "$1" in
  bash|sh|python|python3|airflow) exec "$@" ;;
  *) exec airflow "$@" ;;
esac
