"""Two GPU hosts under Airflow's CeleryExecutor, as deployed (docs/deploy-multi-host.md): the central host is
infra/compose/docker-compose.yml with the `celery` profile (its own workers are host "a"), the second host
"b" is infra/compose/docker-compose.worker.yml with the env file new-env.py --worker-of writes. Host b's
containers are on a network of their own and reach the central host only at HEADAVATAR_CENTRAL on its
published ports (the Docker bridge's address here), sharing the broker, the database, S3 and MLflow and
nothing else. Both hosts' stage containers run on this machine's one engine: each host's GPU lease and
its containers' labels are its own. No GPU here: each host names device 0 (HEADAVATAR_GPU_DEVICES) and
leases it without a GPU request (HEADAVATAR_DOCKER_GPUS=0); host b's worker takes two GPU tasks at once
for it, so its lease, not the worker's concurrency, keeps them apart.

Six captures at once over both hosts must finish with the content digests of a one-host run
(tests/test_compose.py's, or capture 100 on host a alone), on both hosts, with no device of a host leased
twice at a time. A seventh, triggered first, runs beside them with a longer stage 5: the host running that stage is
killed (SIGKILL: its workers and its stage containers) after the stage's first checkpoint; its tasks are
failed by their missed heartbeats and retried on the other host, the stage resumes from its checkpoint,
and every capture finishes whole. Once the retry runs, the lost host is started again, as after a reboot.

Run: `pytest -m compose tests/test_multi_host.py`.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from headavatar.contract.stage import read_manifest
from headavatar.devserver.captures import outputs_as, upload_capture_as
from headavatar.devserver.compose_stack import (
    Stack,
    WorkerHost,
    bridge_address,
    celery_settings,
    running_stack,
    wait_for,
)
from headavatar.layout import stage_prefix
from test_compose import (
    RUN_TIMEOUT,
    SETTINGS,
    STAGES,
    admin_store,
    docker_env,  # noqa: F401 (the module fixture)
)

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(3600)]

HEARTBEAT_TIMEOUT_S = 30  # the scheduler's verdict on a lost worker (300 s by default)
CAPTURES = [f"1{i:02d}" for i in range(1, 7)]
LOST = "107"  # the capture whose stage 5 loses its host
GPU_STAGES = ("matting", "fitting", "meshhead", "gaussianhead")


@pytest.fixture(scope="module")
def central(docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # noqa: F811
    """Host a (one GPU task at a time) of a pool of three: its own one and host b's two."""
    settings = celery_settings(bridge_address(docker_env), host_gpus=1, gpus=3,
                               AIRFLOW_TASK_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT_S))
    with running_stack(docker_env, tmp_path_factory.mktemp("central"), **settings) as st:
        yield st


@pytest.fixture(scope="module")
def host_b(central: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHost]:
    host = WorkerHost(central, tmp_path_factory.mktemp("host-b"), "b", gpu_tasks=2)
    try:
        yield host
    finally:
        host.down()


def test_captures_over_two_hosts_equal_one_host_and_a_lost_host_is_taken_over(
        central: Stack, host_b: WorkerHost, tiny_capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        compose_outputs: dict[str, dict[str, dict[str, str]]]) -> None:
    store = admin_store(central, monkeypatch)
    central.unpause()

    # One host's outputs: tests/test_compose.py's run of these settings (LocalExecutor), else capture 100 here
    # with host b not started.
    reference = compose_outputs.get(json.dumps(SETTINGS, sort_keys=True))
    if reference is None:
        upload_capture_as(store, tiny_capture, "100", tmp_path)
        one_host = central.trigger({"id": "100", **SETTINGS})
        assert central.finished_run(one_host, RUN_TIMEOUT)["state"] == "success"
        assert {t["hostname"] for t in central.task_instances(one_host)} <= {"a-cpu", "a-gpu"}
        reference = outputs_as(store, "100", STAGES)

    # Two hosts: six captures at once, and a seventh whose stage 5 trains 200 steps (a checkpoint every 100). The
    # host running that stage is killed once its first checkpoint is in S3, with whatever else it runs then. The
    # seventh is triggered first, so the host is lost while the six still run and its retry overlaps them.
    host_b.compose("up", "-d")
    for capture in [LOST, *CAPTURES]:
        upload_capture_as(store, tiny_capture, capture, tmp_path)
    started = time.monotonic()
    runs = {LOST: central.trigger({"id": LOST, "profile": "ci", "meshhead_steps": 200, "gaussianhead_steps": 20})}
    runs.update({capture: central.trigger({"id": capture, **SETTINGS}) for capture in CAPTURES})
    checkpoint = store.key(stage_prefix(LOST, "meshhead"), "_state", "checkpoint.pt")
    wait_for("stage 5's first checkpoint", lambda: store.exists(checkpoint), 1800, interval=1)
    running = next(t for t in central.task_instances(runs[LOST]) if t["task_id"] == "meshhead")
    assert running["state"] == "running", running
    lost = running["hostname"].removesuffix("-gpu")
    kill_host(central, host_b, lost)
    # Once that stage runs again on the other host, the lost host comes back (as after a reboot) and takes work
    # again: the remaining captures do not queue for one host's GPU.
    wait_for("stage 5's retry on the other host", lambda: any(
        t["task_id"] == "meshhead" and t["try_number"] >= 2 and t["state"] in ("running", "success")
        for t in central.task_instances(runs[LOST])), RUN_TIMEOUT, interval=2)
    restart_host(central, host_b, lost)
    states = {c: central.finished_run(r, RUN_TIMEOUT)["state"] for c, r in runs.items()}
    print(f"\nseven captures over two hosts, one host lost, in {time.monotonic() - started:.0f} s", file=sys.stderr)
    assert states == dict.fromkeys(runs, "success")

    # The six equal the one-host run, file by file, though some of their tasks died with the lost host.
    for capture in CAPTURES:
        assert outputs_as(store, capture, STAGES) == reference, capture
    tis = {c: central.task_instances(r) for c, r in runs.items()}
    hosts = {t["hostname"] for c in CAPTURES for t in tis[c]}
    assert {"a-gpu", "b-gpu"} <= hosts, hosts  # GPU stages ran on both hosts
    # No GPU of a host leased to two stages at once: host b's worker takes two GPU tasks for its one device.
    leases = [central.return_value(r, t["task_id"])["gpu"] for c, r in runs.items() for t in tis[c]
              if t["task_id"] in GPU_STAGES]
    assert {lease["host"] for lease in leases} == {"a", "b"} and {lease["device"] for lease in leases} == {"0"}
    by_device: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}
    for lease in leases:
        by_device.setdefault((lease["host"], lease["device"]), []).append(
            (datetime.fromisoformat(lease["leased"]), datetime.fromisoformat(lease["released"])))
    for (host, device), spans in by_device.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"host {host} GPU {device} leased twice at once: {spans}"

    # The lost stage 5: retried on the other host, resumed from its checkpoint; nothing half-written taken as done.
    final = next(t for t in tis[LOST] if t["task_id"] == "meshhead")
    assert final["try_number"] >= 2 and final["hostname"] != running["hostname"], final
    meshhead = read_manifest(store, LOST, "meshhead")
    assert meshhead is not None and meshhead.metrics["resumed_from_step"] > 0, meshhead and meshhead.metrics
    for stage in STAGES:  # every file a manifest names is there, at its size
        m = read_manifest(store, LOST, stage)
        assert m is not None, stage
        prefix = store.key(stage_prefix(LOST, stage))
        sizes = {o.key[len(prefix) + 1:]: o.size for o in store.list(prefix)}
        assert all(sizes.get(rel) == e.size for rel, e in m.files.items()), stage
    store.close()


def host_compose(central: Stack, host_b: WorkerHost, host: str, *args: str) -> str:
    """A docker compose command on a worker host's two workers."""
    if host == "b":
        return host_b.compose(*args).stdout
    return central.compose(*args, "airflow-worker-cpu", "airflow-worker-gpu").stdout


def kill_host(central: Stack, host_b: WorkerHost, host: str) -> None:
    """SIGKILL every process of a worker host: its two workers and the stage containers it started."""
    workers = host_compose(central, host_b, host, "ps", "-q").split()
    stages = central.docker("ps", "-q", "--filter", f"label=headavatar.host={host}").split()
    assert workers and stages, (workers, stages)
    central.docker("kill", "--signal", "KILL", *workers, *stages)


def restart_host(central: Stack, host_b: WorkerHost, host: str) -> None:
    """A lost host's workers started again; the stage containers it lost stay gone."""
    host_compose(central, host_b, host, "up", "-d")
