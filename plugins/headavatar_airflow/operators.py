"""The operator factory: one stage -> one task, on the configured backend.

Every backend runs the same command (``headavatar run <stage> --capture <id> ...``), built at run
time from the DAG run's parameters; a non-zero exit fails the task, so Airflow's retries apply.
S3 credentials are read from the Airflow connection when the task runs and handed to the process
as environment only (Docker: ``private_environment``, never rendered or logged; Kubernetes: a
Secret), so they appear in no DAG file, rendered template or log line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.pipeline import StageSpec, cli_args


def s3_environment(conn_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """(settings, secrets) for the stage process from the S3 connection.

    The connection's login/password are the access key pair; its extra may hold ``endpoint_url``,
    ``bucket``, ``prefix`` and ``region_name``.
    """
    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson
    public = {"HEADAVATAR_S3_ENDPOINT": extra.get("endpoint_url"), "HEADAVATAR_S3_BUCKET": extra.get("bucket"),
              "HEADAVATAR_S3_PREFIX": extra.get("prefix"), "AWS_DEFAULT_REGION": extra.get("region_name")}
    secret = {"AWS_ACCESS_KEY_ID": conn.login, "AWS_SECRET_ACCESS_KEY": conn.password}
    return ({k: str(v) for k, v in public.items() if v}, {k: str(v) for k, v in secret.items() if v})


# The CLI's exit code for errors a retry cannot fix: bad input, bad config, missing upstream stage.
FINAL_EXIT_CODES = (2,)


def fail(stage: str, code: int, message: str) -> AirflowException:
    """Final errors fail the task at once; anything else (crash, OOM kill, lost S3) is retried."""
    cls = AirflowFailException if code in FINAL_EXIT_CODES else AirflowException
    return cls(f"headavatar run {stage} exited with {code}: {message}")


def run_environment(context: Any, mlflow_conn_id: str) -> dict[str, str]:
    """Which DAG run and try the stage belongs to (MLflow parent-run key) and the tracking URI, if any."""
    ti = context["ti"]
    env = {"HEADAVATAR_RUN_ID": str(context["run_id"]), "HEADAVATAR_DAG_ID": str(ti.dag_id),
           "HEADAVATAR_TRY_NUMBER": str(ti.try_number)}
    try:
        conn = BaseHook.get_connection(mlflow_conn_id)
    except Exception:  # no tracking server configured: stages run untracked
        return env
    env["MLFLOW_TRACKING_URI"] = conn.extra_dejson.get("tracking_uri") or f"http://{conn.host}:{conn.port or 5000}"
    return env


def _result(last_line: str) -> dict[str, Any] | None:
    """The stage prints one JSON line when it succeeds (manifest URI, cached or not): XCom it."""
    try:
        out = json.loads(last_line)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


class LocalStageOperator(BaseOperator):
    """The stage CLI as a subprocess of the worker, its output streamed into the task log."""

    ui_color = "#e8f4ea"

    def __init__(self, *, stage: StageSpec, settings: ExecutionSettings, **kwargs: Any):
        super().__init__(**kwargs)
        self.stage, self.settings = stage, settings
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> dict[str, Any] | None:
        params = context["params"]
        public, secret = s3_environment(self.settings.s3_conn_id)
        env = {**os.environ, **public, **secret, **run_environment(context, self.settings.mlflow_conn_id)}
        if self.stage.gpu and params.get("gpu") is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(params["gpu"])
        cmd = [sys.executable, "-m", "headavatar.cli", *cli_args(self.stage.name, params)]
        self.log.info("running: headavatar %s", " ".join(cmd[3:]))
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        last = ""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip()
            self.log.info("%s", line)
            last = line.strip() or last
        if (rc := self._proc.wait()) != 0:
            raise fail(self.stage.name, rc, last)
        return _result(last)

    def on_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)  # the CLI unwinds on SIGTERM and removes its scratch space


def _docker_operator() -> type:
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest

    class DockerStageOperator(DockerOperator):
        """One container per attempt: the image's entrypoint is the stage CLI; removed afterwards."""

        def __init__(self, *, stage: StageSpec, settings: ExecutionSettings, **kwargs: Any):
            super().__init__(
                image=settings.cuda_image if stage.gpu else settings.cpu_image,
                docker_url=settings.docker_url, network_mode=settings.docker_network,
                auto_remove="force", mount_tmp_dir=False, mounts=[], privileged=False, tty=False,
                environment={"PYTHONUNBUFFERED": "1"}, **kwargs)
            self.stage, self.settings = stage, settings

        def execute(self, context: Any) -> Any:
            params = context["params"]
            self.command = cli_args(self.stage.name, params)
            public, secret = s3_environment(self.settings.s3_conn_id)
            self.environment = {**self.environment, **public,
                                **run_environment(context, self.settings.mlflow_conn_id)}
            self._private_environment = secret  # DockerOperator keeps these out of templates and logs
            if self.stage.gpu:
                gpu = params.get("gpu")
                self.device_requests = [DeviceRequest(device_ids=[str(gpu)], capabilities=[["gpu"]]) if gpu is not None
                                        else DeviceRequest(count=1, capabilities=[["gpu"]])]
            try:
                return super().execute(context)
            except DockerContainerFailedException as e:
                code = re.search(r"'StatusCode': (\d+)", str(e))
                last = next((str(x).strip() for x in reversed(e.logs or []) if str(x).strip()), "")
                raise fail(self.stage.name, int(code.group(1)) if code else 1, last) from e

    return DockerStageOperator


def _kubernetes_operator() -> type:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import (
        V1EnvFromSource,
        V1PodSecurityContext,
        V1ResourceRequirements,
        V1SecretEnvSource,
        V1Toleration,
    )

    class KubernetesStageOperator(KubernetesPodOperator):
        """One pod per attempt; GPU stages request ``nvidia.com/gpu`` on GPU nodes; pod deleted afterwards."""

        def __init__(self, *, stage: StageSpec, settings: ExecutionSettings, **kwargs: Any):
            gpu = {}
            if stage.gpu:
                key, _, value = settings.k8s_gpu_node_selector.partition("=")
                gpu = {"container_resources": V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                       "node_selector": {key: value},
                       "tolerations": [V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]}
            super().__init__(
                name=f"headavatar-{stage.name}", namespace=settings.k8s_namespace,
                image=settings.cuda_image if stage.gpu else settings.cpu_image, cmds=["headavatar"], arguments=[],
                env_from=[V1EnvFromSource(secret_ref=V1SecretEnvSource(name=settings.k8s_s3_secret))],
                security_context=V1PodSecurityContext(run_as_non_root=True), on_finish_action="delete_pod",
                get_logs=True, **gpu, **kwargs)
            self.stage = stage

        def execute(self, context: Any) -> Any:
            self.arguments = cli_args(self.stage.name, context["params"])
            return super().execute(context)

    return KubernetesStageOperator


def stage_operator(stage: StageSpec, settings: ExecutionSettings | None = None, **kwargs: Any) -> BaseOperator:
    """The task for one stage. GPU stages share the GPU pool, sized to the GPUs available."""
    settings = settings or ExecutionSettings()
    if stage.gpu:
        kwargs.setdefault("pool", settings.gpu_pool)
    cls = {"local": lambda: LocalStageOperator, "docker": _docker_operator,
           "kubernetes": _kubernetes_operator}[settings.backend]()
    return cls(task_id=stage.name, stage=stage, settings=settings, **kwargs)
