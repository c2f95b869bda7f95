"""Airflow adapters for the headavatar stage CLI (on Airflow's plugins path, imported by the DAG files).

Nothing here computes: every task runs ``headavatar run <stage> --capture <id>`` in a container,
a pod or a local subprocess, and the stage's own cache (manifests) makes retries and clears cheap.
"""
