"""The operator factory: one stage -> one task, on the configured backend.

Every backend runs the same command (``headavatar run <stage> --capture <id> ...``), built at run
time from the DAG run's parameters; a non-zero exit fails the task, so Airflow's retries apply, except
exit 2 (``EXIT_FINAL``: failed for good) and exit 79 (``EXIT_BUSY``: another run is computing the stage;
the task is rescheduled to wait for it, no retry used: ``wait_for_busy_stage``).
S3 credentials are read from the Airflow connection when the task runs and handed to the process
as environment only (Docker: ``private_environment``, never rendered or logged; Kubernetes: a
Secret), so they appear in no DAG file, rendered template or log line. The command itself is a
rendered template field (``stage_command``), so the UI shows what each task ran. GPU stages on the
docker and local backends run on a GPU leased to the task (``gpus.py``); a task that updates an
Asset (the last stage: the finished avatar) says in the event which capture it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowRescheduleException

from headavatar.errors import EXIT_BUSY, EXIT_FINAL
from headavatar_airflow.assets import describe_outlet_events
from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.gpus import GPU_LABEL, HOST_LABEL, placed_gpu
from headavatar_airflow.pipeline import StageSpec, cli_args
from headavatar_airflow.stage_limits import StageLimits, stage_limits


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
FINAL_EXIT_CODES = (EXIT_FINAL,)
# How long a task waits for another run of its stage when it has no time limit of its own (a stage task has
# one, orchestration.<stage>_timeout_h, and waits at most that long: see wait_for_busy_stage).
BUSY_WAIT_LIMIT = timedelta(hours=24)


def fail(command: str, code: int, message: str, task: BaseOperator | None = None, context: Any = None,
         settings: ExecutionSettings | None = None) -> AirflowException:
    """Final errors fail the task at once; a stage another run is computing (``EXIT_BUSY``) waits for it
    (``task`` given: the stage tasks); anything else (crash, OOM kill, lost S3) is retried."""
    if code == EXIT_BUSY and task is not None:
        return wait_for_busy_stage(task, context, command, message, settings or ExecutionSettings())
    cls = AirflowFailException if code in FINAL_EXIT_CODES else AirflowException
    return cls(f"headavatar {command} exited with {code}: {message}")


def wait_for_busy_stage(task: BaseOperator, context: Any, command: str, message: str,
                        settings: ExecutionSettings) -> AirflowException:
    """The task's answer to a stage whose lock another run holds (exit ``EXIT_BUSY``; ``message``, the CLI's
    error line, names the holder): Airflow's reschedule, which ends this try without failing it. The task
    goes to ``up_for_reschedule``, holds no worker slot, pool slot or GPU lease meanwhile, and runs again with
    the same try number after the delay (Airflow 3's scheduler holds any task in that state until its
    reschedule date: ``TaskInstance.are_dependencies_met`` adds ``ReadyToRescheduleDep``; no sensor needed).
    It then finds the other run's result (a cache hit) or its lease expired (it computes the stage).

    The delay starts at ``busy_poll_s`` and doubles up to ``busy_poll_max_s``. Once the task has waited
    longer than its own time limit (``execution_timeout``: no attempt of the stage should take longer, so
    a holder still alive then is stuck, e.g. an orphaned container), it fails for good, saying so."""
    ctx = context or {}
    count = int(ctx.get("task_reschedule_count", 0) or 0)
    ti = ctx.get("ti")
    first = ti.get_first_reschedule_date(ctx) if ti is not None and count else None
    now = datetime.now(UTC)
    waited = now - first if first is not None else timedelta(0)
    limit = task.execution_timeout or BUSY_WAIT_LIMIT
    if waited > limit:
        return AirflowFailException(
            f"headavatar {command}: gave up waiting for another run of this stage after {_hours(waited)} (the "
            f"task's time limit is {_hours(limit)}): {message}. Stop that run (or, if it is gone, delete its "
            "lock) and clear this task")
    delay = min(settings.busy_poll_s * 2 ** min(count, 20), max(settings.busy_poll_s, settings.busy_poll_max_s))
    task.log.info("stage busy: waiting %.0f s, no retry used (waited %s of at most %s so far): %s",
                  delay, _hours(waited), _hours(limit), message)
    return AirflowRescheduleException(now + timedelta(seconds=delay))


def _hours(d: timedelta) -> str:
    return f"{d.total_seconds() / 3600:.2f} h" if d >= timedelta(hours=1) else f"{d.total_seconds():.0f} s"


def task_command(stage: StageSpec, context: Any, command: list[str] | None) -> list[str]:
    """The CLI arguments of a task: a fixed command (ingestion's ``unpack``) or the stage's run."""
    return list(command) if command is not None else cli_args(stage.name, context["params"], str(context["run_id"]))


# The CLI commands that write their result (JSON: manifest URI, cached or not, MLflow run) to ``--result-file``.
# The task returns it from that file, not from the output's last line: stdout and stderr reach the task log as
# one stream, and a line written after the result (a library's warning at exit, another process's) took its
# place once, so the task lost its XCom (the GPU lease record, the MLflow link) though the stage succeeded.
RESULT_COMMANDS = ("run", "unpack")


def writes_result(args: list[str]) -> bool:
    return bool(args) and args[0] in RESULT_COMMANDS


def with_result_file(args: list[str], path: str) -> list[str]:
    return [*args, "--result-file", path] if writes_result(args) else args


def read_result(text: str | bytes, args: list[str]) -> dict[str, Any]:
    """A result file's content; a command that exited 0 without a readable one fails its try (retried: a
    finished stage's retry is a cache hit)."""
    try:
        out = json.loads(text)
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise AirflowException(f"headavatar {' '.join(args[:2])} exited with 0 but wrote no result to --result-file")
    return out


def stage_command_line(stage: StageSpec, context: Any, command: list[str] | None) -> str:
    return shlex.join(["headavatar", *task_command(stage, context, command)])


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


def lease_holder(context: Any) -> str:
    ti = context["ti"]
    return f"{ti.dag_id}/{context['run_id']}/{ti.task_id} try {ti.try_number}"


class ShowsStageCommand:
    """``stage_command`` in the task's rendered templates (the UI's "Rendered Template" tab): the exact
    command line, made from the run's parameters as ``execute`` makes it (params are known only then)."""

    stage: StageSpec
    cli_command: list[str] | None
    stage_command: str

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)  # type: ignore[misc]
        self.stage_command = stage_command_line(self.stage, context, self.cli_command)


def mlflow_endpoints(conn_id: str) -> tuple[str, str] | None:
    """(tracking URI the stages use, URL a browser opens) from the MLflow connection, or None when unset.

    Extra ``tracking_uri`` (else ``http://host:port``); extra ``ui_url`` when the browser reaches the
    server under another name than the workers do (compose service names, cluster DNS).
    """
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # no tracking server configured: stages run untracked
        return None
    extra = conn.extra_dejson
    uri = extra.get("tracking_uri") or f"http://{conn.host}:{conn.port or 5000}"
    return uri, (extra.get("ui_url") or uri).rstrip("/")


def run_environment(context: Any, mlflow_conn_id: str) -> dict[str, str]:
    """Which DAG run and try the stage belongs to (MLflow parent-run key) and the tracking URI, if any."""
    ti = context["ti"]
    env = {"HEADAVATAR_RUN_ID": str(context["run_id"]), "HEADAVATAR_DAG_ID": str(ti.dag_id),
           "HEADAVATAR_TRY_NUMBER": str(ti.try_number)}
    if (endpoints := mlflow_endpoints(mlflow_conn_id)) is not None:
        env["MLFLOW_TRACKING_URI"] = endpoints[0]
        env["HEADAVATAR_MLFLOW_UI_URL"] = endpoints[1]  # links a person follows (the comparison report's)
    return env


def mlflow_credentials(conn_id: str) -> dict[str, str]:
    """MLFLOW_TRACKING_USERNAME/PASSWORD from the MLflow connection's login/password (a server behind
    basic auth, as in the compose stack): secrets, handed over like the S3 keys. Empty when unset."""
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # no tracking server configured
        return {}
    creds = {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password}
    return {k: str(v) for k, v in creds.items() if v}


class MLflowRunLink(BaseOperatorLink):
    """"MLflow run" on the task: the stage's child run. Computed by the worker when the task ends
    (Airflow 3 stores it as XCom), from the run the stage reported."""

    name = "MLflow run"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return getattr(operator, "mlflow_run_url", "") or ""


def remember_mlflow_run(operator: BaseOperator, result: dict[str, Any] | None, mlflow_conn_id: str) -> None:
    run = (result or {}).get("mlflow")
    endpoints = mlflow_endpoints(mlflow_conn_id)
    if run and endpoints:
        operator.mlflow_run_url = f"{endpoints[1]}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"


class LocalStageOperator(ShowsStageCommand, BaseOperator):
    """The stage CLI as a subprocess of the worker, its output streamed into the task log. A GPU stage
    sees only its leased GPU (``CUDA_VISIBLE_DEVICES``)."""

    ui_color = "#e8f4ea"
    operator_extra_links = (MLflowRunLink(),)
    template_fields = ("stage_command",)
    program: tuple[str, ...] = (sys.executable, "-m", "headavatar.cli")  # what runs the CLI arguments
    stop_grace_s = 30.0  # after SIGTERM, before SIGKILL (the CLI removes its scratch space meanwhile)

    def __init__(self, *, stage: StageSpec, settings: ExecutionSettings, command: list[str] | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.stage, self.settings, self.cli_command = stage, settings, command
        self.stage_command = ""
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> dict[str, Any] | None:
        params = context["params"]
        public, secret = s3_environment(self.settings.s3_conn_id)
        env = {**os.environ, **public, **secret, **mlflow_credentials(self.settings.mlflow_conn_id),
               **run_environment(context, self.settings.mlflow_conn_id)}
        args = task_command(self.stage, context, self.cli_command)
        if not self.stage.gpu:
            return self._run(args, env, context)
        with placed_gpu(self.settings, params, lease_holder(context), count=self.stage.gpus(params)) as lease:
            if lease is None:
                return self._run(args, env, context)
            env["CUDA_VISIBLE_DEVICES"] = lease.device
            return self._run(args, env, context, holds=lease.fds)  # the stage holds the lease too

    def _run(self, args: list[str], env: dict[str, str], context: Any,
             holds: tuple[int, ...] = ()) -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory(prefix="headavatar-task-") as tmp:
            result_file = Path(tmp) / "result.json"
            self.log.info("running: headavatar %s", " ".join(args))
            self._proc = subprocess.Popen([*self.program, *with_result_file(args, str(result_file))], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True, pass_fds=holds)
            last = ""
            assert self._proc.stdout is not None
            try:
                for line in self._proc.stdout:
                    line = line.rstrip()
                    self.log.info("%s", line)
                    last = line.strip() or last
                rc = self._proc.wait()
            finally:  # a timeout or a kill of the task: the stage ends before its GPU lease does
                self._stop()
            if rc != 0:
                raise fail(" ".join(args[:2]), rc, last, self, context, self.settings)
            result = (read_result(result_file.read_bytes() if result_file.exists() else b"", args)
                      if writes_result(args) else None)
        remember_mlflow_run(self, result, self.settings.mlflow_conn_id)
        describe_outlet_events(self, context, result)
        return result

    def _stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)  # the CLI unwinds on SIGTERM and removes its scratch space
        try:
            self._proc.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def on_kill(self) -> None:
        self._stop()


SCRATCH = "/scratch"  # the images' HEADAVATAR_SCRATCH, declared as a VOLUME there
CONTAINER_RESULT = "/tmp/headavatar-result.json"  # --result-file in the container's own layer, read after it exits
# Worker settings a container needs too (the local backend inherits the whole environment).
PASSED_THROUGH = ("HEADAVATAR_MLFLOW_EXPERIMENT", "HEADAVATAR_MLFLOW_MODEL_PREFIX")
# The host's CPU workarounds for OpenBLAS (e.g. OPENBLAS_CORETYPE where it misdetects the processor):
# the container runs on the same CPU, and without them numpy took other kernels there, so the same
# stage gave other floating-point results in a container than as a subprocess.
PASSED_THROUGH_PREFIXES = ("OPENBLAS_",)


# Every stage container's. OpenMP threads that wait sleep instead of spinning: a host runs several stages at
# once (a Celery worker per queue, one GPU task per GPU beside the CPU stages), each with a thread per core, and
# spinning threads of one stage took the cores the others needed (4 stages on 2 cores: 2.5x less work done).
# The numbers a stage computes do not change.
CONTAINER_ENV = {"PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def passed_through(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's variables a stage container gets as they are (never credentials)."""
    return {k: v for k, v in environ.items()
            if v and (k in PASSED_THROUGH or k.startswith(PASSED_THROUGH_PREFIXES))}


def _docker_operator() -> type:
    import io
    import tarfile
    import uuid

    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.errors import APIError, NotFound
    from docker.types import Mount

    class DockerStageOperator(ShowsStageCommand, DockerOperator):
        """One container per attempt: the image's entrypoint is the stage CLI, its output streamed
        into the task log. Scratch space (stage 1's decoded frames) is a named volume made for the
        attempt, not the container's writable layer; container and volume are removed afterwards,
        also when the task is killed or times out (the container is stopped: the CLI unwinds on SIGTERM).
        The container is removed here, not by the provider, so that its exit code and result file are read
        from the exited container first. A GPU stage's container gets its leased GPU
        (``DeviceRequest(device_ids=[...])``)."""

        operator_extra_links = (MLflowRunLink(),)
        template_fields = (*DockerOperator.template_fields, "stage_command")

        def __init__(self, *, stage: StageSpec, settings: ExecutionSettings, command: list[str] | None = None,
                     **kwargs: Any):
            super().__init__(
                image=settings.cuda_image if stage.gpu else settings.cpu_image,
                docker_url=settings.docker_url, network_mode=settings.docker_network,
                auto_remove="never", mount_tmp_dir=False, mounts=[], privileged=False, tty=False,
                environment=dict(CONTAINER_ENV), **kwargs)
            self.stage, self.settings, self.cli_command = stage, settings, command
            self.stage_command = ""
            self.scratch_volume: str | None = None
            self.gpu_device: str | None = None  # the leased GPU of a GPU stage

        def execute(self, context: Any) -> Any:
            if not self.stage.gpu:
                return self._execute(context)
            count = self.stage.gpus(context["params"])
            # Leased also without a GPU request (HEADAVATAR_DOCKER_GPUS=0, the CPU build of the stage image): the
            # lease places GPU stages on this host's devices, one stage per device, either way.
            with placed_gpu(self.settings, context["params"], lease_holder(context),
                            busy=self._gpus_of_running_stages, count=count) as lease:
                self.gpu_device = lease.device if lease else None
                if self.settings.docker_gpus:
                    self.device_requests = [gpu_request(self.gpu_device, count)]
                leased = utc_now()
                result = self._execute(context)
                if lease is not None and isinstance(result, dict):  # which GPU of which host, and when (XCom)
                    result["gpu"] = {"host": self.settings.host, "device": lease.device,
                                     "leased": leased, "released": utc_now()}
                return result

        def _gpus_of_running_stages(self) -> set[str]:
            """GPUs of this host's running stage containers (labelled): held even after their task died."""
            labels = [c["Labels"] for c in self.cli.containers(filters={"label": GPU_LABEL})]
            return {d for label in labels if label.get(HOST_LABEL, self.settings.host) == self.settings.host
                    for d in label[GPU_LABEL].split(",")}

        def _execute(self, context: Any) -> Any:
            args = task_command(self.stage, context, self.cli_command)
            self.command = with_result_file(args, CONTAINER_RESULT)
            public, secret = s3_environment(self.settings.s3_conn_id)
            self.environment = {**self.environment, **public,
                                **passed_through(os.environ),
                                **run_environment(context, self.settings.mlflow_conn_id)}
            # DockerOperator keeps these out of templates and logs
            self._private_environment = {**secret, **mlflow_credentials(self.settings.mlflow_conn_id)}
            ti = context["ti"]
            self.labels = {"headavatar.dag_id": str(ti.dag_id), "headavatar.task_id": str(self.task_id),
                           "headavatar.run_id": str(context["run_id"]), HOST_LABEL: self.settings.host,
                           **({GPU_LABEL: self.gpu_device} if self.gpu_device is not None else {})}
            self.scratch_volume = f"headavatar-scratch-{ti.dag_id}-{self.task_id}-{uuid.uuid4().hex[:12]}"
            self.cli.create_volume(self.scratch_volume, labels={**self.labels, "headavatar.scratch": "1"})
            self.mounts = [Mount(target=SCRATCH, source=self.scratch_volume, type="volume")]
            try:
                super().execute(context)  # its output into the task log, until it exits
                result = read_result(self._result_file(), args) if writes_result(args) else None
            except DockerContainerFailedException as e:
                code = self.cli.inspect_container(self.container["Id"])["State"]["ExitCode"]
                last = next((str(x).strip() for x in reversed(e.logs or []) if str(x).strip()), "")
                raise fail(" ".join(args[:2]), code, last, self, context, self.settings) from e
            except BaseException:  # a timeout or kill: stop the container before the GPU lease ends
                self.on_kill()
                raise
            finally:
                self._remove_container()
                self._remove_scratch()
            remember_mlflow_run(self, result, self.settings.mlflow_conn_id)
            describe_outlet_events(self, context, result)
            return result

        def _result_file(self) -> bytes:
            """The exited container's ``--result-file`` (empty when it wrote none)."""
            try:
                chunks, _ = self.cli.get_archive(self.container["Id"], CONTAINER_RESULT)
            except NotFound:
                return b""
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
                member = tar.extractfile(os.path.basename(CONTAINER_RESULT))
                return member.read() if member is not None else b""

        def on_kill(self) -> None:
            try:  # stops it: SIGTERM, then SIGKILL after 10 s
                super().on_kill()
            except APIError as e:  # already gone: nothing left to stop
                self.log.info("container already removed: %s", e)
            finally:
                self._remove_container()  # stopped once: a second on_kill (the runner's, after a timeout) is a no-op
                self._remove_scratch()

        def _remove_container(self) -> None:
            if self.container is None:
                return
            with contextlib.suppress(NotFound):  # already removed
                self.cli.remove_container(self.container["Id"], force=True)
            self.container = None

        def _remove_scratch(self) -> None:
            if self.scratch_volume is None:
                return
            try:
                self.cli.remove_volume(self.scratch_volume, force=True)
            except APIError as e:  # still in use by a container being removed: logged, not fatal
                self.log.warning("could not remove scratch volume %s: %s", self.scratch_volume, e)
            else:
                self.scratch_volume = None

    return DockerStageOperator


def gpu_request(device: str | None, count: int = 1) -> Any:
    """The container's GPUs: the leased ones (``device``: indices, comma-joined); any ``count`` (the engine's
    first ones) only when the host's GPUs are unknown."""
    from docker.types import DeviceRequest

    if device is None:
        return DeviceRequest(count=count, capabilities=[["gpu"]])
    return DeviceRequest(device_ids=device.split(","), capabilities=[["gpu"]])


XCOM_RESULT = "/airflow/xcom/return.json"  # where KubernetesPodOperator's sidecar reads a pod's XCom


def _kubernetes_operator() -> type:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import (
        V1Capabilities,
        V1ConfigMapEnvSource,
        V1EnvFromSource,
        V1EnvVar,
        V1PodSecurityContext,
        V1ResourceRequirements,
        V1SeccompProfile,
        V1SecretEnvSource,
        V1SecurityContext,
        V1Toleration,
    )

    class KubernetesStageOperator(ShowsStageCommand, KubernetesPodOperator):
        """One pod per attempt, requesting the stage's CPU, memory and node disk (``orchestration.*``; memory
        and disk also as limits); GPU stages request ``nvidia.com/gpu`` on GPU nodes (the device plugin
        picks the GPU); pod deleted afterwards. Exit 2 fails the task without a retry; exit 79 waits."""

        operator_extra_links = (MLflowRunLink(),)
        template_fields = (*KubernetesPodOperator.template_fields, "stage_command")

        def __init__(self, *, stage: StageSpec, settings: ExecutionSettings, command: list[str] | None = None,
                     limits: StageLimits | None = None, **kwargs: Any):
            requests, caps = {}, {}
            if limits is not None:
                requests = {"cpu": limits.cpu, "memory": limits.memory, "ephemeral-storage": limits.ephemeral_storage}
                caps = {"memory": limits.memory, "ephemeral-storage": limits.ephemeral_storage}
            gpu = {}
            if stage.gpu:
                caps["nvidia.com/gpu"] = "1"
                key, _, value = settings.k8s_gpu_node_selector.partition("=")
                gpu = {"node_selector": {key: value},
                       "tolerations": [V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]}
            if requests or caps:
                gpu["container_resources"] = V1ResourceRequirements(requests=requests or None, limits=caps or None)
            super().__init__(
                name=f"headavatar-{stage.name}", namespace=settings.k8s_namespace,
                image=settings.cuda_image if stage.gpu else settings.cpu_image, cmds=["headavatar"], arguments=[],
                env_from=[V1EnvFromSource(secret_ref=V1SecretEnvSource(name=settings.k8s_s3_secret)),
                          V1EnvFromSource(config_map_ref=V1ConfigMapEnvSource(name=settings.k8s_settings))],
                security_context=V1PodSecurityContext(run_as_non_root=True, run_as_user=10001, run_as_group=10001,
                                                      seccomp_profile=V1SeccompProfile(type="RuntimeDefault")),
                container_security_context=V1SecurityContext(allow_privilege_escalation=False,
                                                             capabilities=V1Capabilities(drop=["ALL"])),
                on_finish_action="delete_pod",
                get_logs=True, do_xcom_push=command is None or writes_result(command), **gpu, **kwargs)
            self.stage, self.mlflow_conn_id, self.cli_command = stage, settings.mlflow_conn_id, command
            self.busy_settings = settings
            self.stage_command = ""

        def request_gpus(self, params: dict[str, Any]) -> None:
            """The pod's ``nvidia.com/gpu`` limit for this run: data-parallel stage 6 asks for one per rank, and
            for the memory of as many processes (each rank holds the capture's views)."""
            res, n = self.container_resources, self.stage.gpus(params)
            if not self.stage.gpu or res is None:
                return
            if n > 1:
                res.requests = {k: _times(v, n) if k == "memory" else v for k, v in (res.requests or {}).items()}
                res.limits = {k: _times(v, n) if k == "memory" else v for k, v in (res.limits or {}).items()}
            res.limits = {**(res.limits or {}), "nvidia.com/gpu": str(n)}

        def execute(self, context: Any) -> Any:
            self.request_gpus(context["params"])
            args = task_command(self.stage, context, self.cli_command)
            self.arguments = with_result_file(args, XCOM_RESULT)  # where the xcom sidecar reads it
            run_env = run_environment(context, self.mlflow_conn_id)  # the tracking URI may also come from
            self.env_vars = [V1EnvVar(name=k, value=v) for k, v in run_env.items()]  # the settings ConfigMap
            result = super().execute(context)  # read back from the pod by the xcom sidecar
            if not writes_result(args):
                return None
            remember_mlflow_run(self, result if isinstance(result, dict) else None, self.mlflow_conn_id)
            describe_outlet_events(self, context, result if isinstance(result, dict) else None)
            return result

        def cleanup(self, pod: Any, remote_pod: Any, xcom_result: dict | None = None, context: Any = None) -> None:
            """The provider fails a failed pod with a retryable error; the CLI's final exit codes fail it for good,
            and a stage another run is computing (``EXIT_BUSY``) waits for it."""
            try:
                super().cleanup(pod, remote_pod, xcom_result, context)
            except AirflowFailException:
                raise
            except AirflowException as e:
                code = exit_code(remote_pod, self.base_container_name)
                if code in FINAL_EXIT_CODES or code == EXIT_BUSY:  # the pod's log above names a busy lock's holder
                    raise fail(" ".join(self.arguments[:2]), code, str(e).splitlines()[0], self, context,
                               self.busy_settings) from e
                raise

    return KubernetesStageOperator


def _times(quantity: str, n: int) -> str:
    """A Kubernetes quantity such as ``64Gi`` times ``n`` (``128Gi``)."""
    number, unit = re.fullmatch(r"([0-9.]+)(.*)", quantity).groups()  # type: ignore[union-attr]
    return f"{float(number) * n:g}{unit}"


def exit_code(pod: Any, container: str) -> int | None:
    """The exit code of a pod's terminated container, None while it has none."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    state = next((s.state for s in statuses if s.name == container), None)
    return state.terminated.exit_code if state is not None and state.terminated is not None else None


def stage_operator(stage: StageSpec, settings: ExecutionSettings | None = None, **kwargs: Any) -> BaseOperator:
    """The task for one stage. GPU stages share the GPU pool, sized to the GPUs available; a pipeline
    stage gets its attempt time limit (and, on Kubernetes, its pod requests) from ``orchestration.*``.
    ``command=[...]`` runs another CLI command in the stage's image (ingestion's ``unpack``)."""
    settings = settings or ExecutionSettings()
    if stage.gpu:
        kwargs.setdefault("pool", settings.gpu_pool)
        kwargs.setdefault("queue", settings.gpu_queue)
    limits = stage_limits(stage.name)
    if limits is not None:
        kwargs.setdefault("execution_timeout", limits.timeout)
        if settings.backend == "kubernetes":
            kwargs.setdefault("limits", limits)
    cls = {"local": lambda: LocalStageOperator, "docker": _docker_operator,
           "kubernetes": _kubernetes_operator}[settings.backend]()
    return cls(task_id=kwargs.pop("task_id", stage.name), stage=stage, settings=settings, **kwargs)
