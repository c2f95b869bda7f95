"""
### Cross-capture comparison, refreshed whenever an avatar is finished

Scheduled on the `headavatar_avatar` Asset, which the last stage of `headavatar_capture` updates:
runs `headavatar compare --mlflow` (held-out metrics of every trained avatar, from the MLflow
server) on the stages' backend and logs the table, CSV and HTML report (charts, each capture's
avatar variants with the settings that differ and their videos side by side) to MLflow as a run of
kind `compare` (experiment `headavatar`), linked from every compared model version. Several avatars
finished close together make one run.
"""

from datetime import timedelta

from airflow.sdk import DAG

from headavatar_airflow.assets import AVATAR
from headavatar_airflow.notify import StageFailureNotifier
from headavatar_airflow.operators import stage_operator
from headavatar_airflow.pipeline import StageSpec

COMPARE = StageSpec("compare", gpu=False)

with DAG(
    dag_id="headavatar_compare",
    description="refresh the cross-capture avatar comparison in MLflow",
    schedule=[AVATAR],
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "on_failure_callback": StageFailureNotifier()},
    dagrun_timeout=timedelta(hours=2),
    tags=["headavatar"],
    doc_md=__doc__,
):
    stage_operator(COMPARE, command=["compare", "--mlflow"], execution_timeout=timedelta(hours=1))
