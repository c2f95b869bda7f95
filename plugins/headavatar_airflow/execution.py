"""Where stage commands run, read once when the DAG file is parsed (environment, never secrets).

``HEADAVATAR_EXECUTION``: ``docker`` (default; one container per task; ``make demo`` and the
``docker`` tests run it on the project's own engine), ``kubernetes`` (one pod per task) or ``local``
(a subprocess of the worker; ``make demo BACKEND=local``). Credentials come from the Airflow
connection ``headavatar_s3`` (docker, local) or the Kubernetes Secret named below (kubernetes) at
run time; ingestion, which writes ``raw/``, may use its own (``HEADAVATAR_INGEST_S3_CONN_ID``,
``HEADAVATAR_K8S_INGEST_S3_SECRET``; unset = the stages'), so the stages' identity can be denied
``raw/`` writes (the compose stack does: infra/policies). ``HEADAVATAR_DOCKER_GPUS=0`` runs the GPU
stages' image without a GPU request (the CPU stage image, ``headavatar/cpu``, on a machine without GPUs).
``HEADAVATAR_GPU_DEVICES``: the GPUs of this host that GPU tasks are placed on (``0,1,2,3`` or GPU
UUIDs; unset = ``nvidia-smi``'s list when it is on PATH), each leased to one running task at a time
through lock files in
``HEADAVATAR_GPU_LEASE_DIR`` (one directory per host, seen by every worker of that host).
``HEADAVATAR_BUSY_POLL_S`` / ``HEADAVATAR_BUSY_POLL_MAX_S``: how long a task whose stage another run is
computing (the CLI's exit ``EXIT_BUSY``) waits before it looks again, first and at most (default 30 s,
doubling each time, up to 300 s); see ``operators.wait_for_busy_stage``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class ExecutionSettings:
    backend: str = field(default_factory=lambda: _env("HEADAVATAR_EXECUTION", "docker"))
    cpu_image: str = field(default_factory=lambda: _env("HEADAVATAR_CPU_IMAGE", "headavatar/preprocess:0.1.0"))
    cuda_image: str = field(default_factory=lambda: _env("HEADAVATAR_CUDA_IMAGE", "headavatar/cuda:0.1.0"))
    s3_conn_id: str = field(default_factory=lambda: _env("HEADAVATAR_S3_CONN_ID", "headavatar_s3"))
    ingest_s3_conn_id: str | None = field(default_factory=lambda: os.environ.get("HEADAVATAR_INGEST_S3_CONN_ID"))
    mlflow_conn_id: str = field(default_factory=lambda: _env("HEADAVATAR_MLFLOW_CONN_ID", "headavatar_mlflow"))
    gpu_pool: str = field(default_factory=lambda: _env("HEADAVATAR_GPU_POOL", "headavatar_gpu"))
    # The Celery queue of GPU tasks (every GPU host's worker takes it; CPU tasks go to Airflow's default
    # queue). Executors without queues (Local, Kubernetes) ignore it.
    gpu_queue: str = field(default_factory=lambda: _env("HEADAVATAR_GPU_QUEUE", "gpu"))
    docker_url: str = field(default_factory=lambda: _env("HEADAVATAR_DOCKER_URL", "unix://var/run/docker.sock"))
    docker_network: str | None = field(default_factory=lambda: os.environ.get("HEADAVATAR_DOCKER_NETWORK"))
    docker_gpus: bool = field(default_factory=lambda: _env("HEADAVATAR_DOCKER_GPUS", "1") != "0")
    gpu_devices: tuple[str, ...] = field(default_factory=lambda: tuple(
        d.strip() for d in os.environ.get("HEADAVATAR_GPU_DEVICES", "").split(",") if d.strip()))
    gpu_lease_dir: str = field(default_factory=lambda: _env("HEADAVATAR_GPU_LEASE_DIR", "/tmp/headavatar-gpu-leases"))
    # This host's name (Celery: one worker per host; its GPU queue is gpu.<host>). Stage containers carry it as
    # a label, so GPUs in use are told apart per host even where two "hosts" share one Docker engine.
    host: str = field(default_factory=lambda: _env("HEADAVATAR_HOST", "main"))
    # A task waiting for another run of its stage (exit EXIT_BUSY) looks again after busy_poll_s, doubling each
    # time up to busy_poll_max_s. A dead holder's lease expires after storage.lock_ttl_s (90 s by default), so the
    # first looks come soon after; a live holder usually runs for as long as its stage (minutes to hours), so
    # later ones come every 5 min: one short CLI run (a container or pod start) each, no slot held in between.
    busy_poll_s: float = field(default_factory=lambda: float(_env("HEADAVATAR_BUSY_POLL_S", "30")))
    busy_poll_max_s: float = field(default_factory=lambda: float(_env("HEADAVATAR_BUSY_POLL_MAX_S", "300")))
    k8s_namespace: str = field(default_factory=lambda: _env("HEADAVATAR_K8S_NAMESPACE", "headavatar"))
    k8s_s3_secret: str = field(default_factory=lambda: _env("HEADAVATAR_K8S_S3_SECRET", "headavatar-s3"))
    k8s_ingest_s3_secret: str | None = field(default_factory=lambda: os.environ.get("HEADAVATAR_K8S_INGEST_S3_SECRET"))
    k8s_settings: str = field(default_factory=lambda: _env("HEADAVATAR_K8S_SETTINGS", "headavatar-settings"))
    k8s_gpu_node_selector: str = field(default_factory=lambda: _env("HEADAVATAR_K8S_GPU_NODES",
                                                                    "nvidia.com/gpu.present=true"))

    def for_ingestion(self) -> ExecutionSettings:
        """The same settings with ingestion's S3 identity in place of the stages' (the stages' where unset)."""
        return replace(self, s3_conn_id=self.ingest_s3_conn_id or self.s3_conn_id,
                       k8s_s3_secret=self.k8s_ingest_s3_secret or self.k8s_s3_secret)

    def __post_init__(self) -> None:
        if self.backend not in ("docker", "kubernetes", "local"):
            raise ValueError(f"HEADAVATAR_EXECUTION must be docker, kubernetes or local, not {self.backend!r}")
