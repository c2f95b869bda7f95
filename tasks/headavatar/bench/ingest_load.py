"""Many captures at once through the deployed multi-host stack (issue 32, item 3): the compose stack's `celery`
profile (host a) and an added worker host (b), scheduled ingestion every minute, and ``--captures`` small
synthetic captures uploaded within a minute. Measured from Airflow's own records (REST API) once every run ended:

* ingestion: how many capture runs each capture got (one is right), which ingestion run triggered it, and how
  often a later ingestion run listed it again while it trained (its trigger then skipped, the run id existing);
* time from each capture's upload (its ``_COMPLETE`` marker) to its run and to its first task started;
* captures per hour, and how busy each worker was (task seconds over its slots and the busy window);
* depth-first priority (``weight_rule="upstream"``): captures in progress over time, and whether captures
  finished in the order they started (Kendall's tau of start rank against finish rank);
* none lost or run twice: every run succeeded, every task ran once (try 1), every stage wrote its manifest,
  and all captures (copies of one) have the same outputs.

    python -m headavatar.bench.ingest_load --captures 20 --out benchmarks/results/ingest_load.json

Needs the project's Docker engine (started here if none runs) and a quiet machine: the stage containers of
both hosts run on this machine, so the figures are this machine's CPU, not a GPU cluster's.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from headavatar.bench.provenance import stamp
from headavatar.devserver.captures import outputs_as, upload_capture_as, write_tiny_capture
from headavatar.devserver.common import REPO
from headavatar.devserver.compose_stack import (
    Stack,
    WorkerHost,
    bridge_address,
    celery_settings,
    docker_engine_env,
    running_stack,
    wait_for,
)
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

STAGES = STAGE_NAMES
GPU_STAGES = STAGES[2:]  # one pool (headavatar_gpu): the scheduler picks among them by priority weight
# What each ingested capture runs: the plumbing profile and short training, as the compose tests' runs.
RUN_PARAMS = {"profile": "ci", "meshhead_steps": 20, "gaussianhead_steps": 20}
SLOTS = {"a-cpu": 2, "a-gpu": 1, "b-cpu": 2, "b-gpu": 2}  # tasks each worker (its container's hostname) takes at once


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass(frozen=True)
class Span:
    """One task's run on a worker, in seconds from the first upload: when its upstream task ended (``ready``;
    None for the first stage), when the scheduler queued it, when it started and ended; its priority weight."""

    capture: str
    task: str
    worker: str
    start: float
    end: float
    queued: float | None = None
    ready: float | None = None
    weight: int = 1


def priority_picks(spans: list[Span], tasks: tuple[str, ...]) -> dict[str, int]:
    """Over ordered pairs of ``tasks`` (one pool's) where the higher-priority one (x) was ready by the time the
    other (y) was queued: how often x was queued first (the priority held) and how often y was (inverted)."""
    mine = [s for s in spans if s.task in tasks and s.ready is not None and s.queued is not None]
    held = inverted = 0
    for x, y in itertools.permutations(mine, 2):
        if x.weight > y.weight and x.ready <= y.queued:
            held += x.queued <= y.queued
            inverted += x.queued > y.queued
    return {"held": held, "inverted": inverted}


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long sequences: 1 when they order every pair alike, -1 when oppositely."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return 1.0
    score = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs)
    return score / len(pairs)


def in_progress(intervals: list[tuple[float, float]]) -> tuple[int, float]:
    """(most, time-weighted mean) of how many ``(start, end)`` intervals overlap, over their union's extent."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = level = 0
    area, last = 0.0, events[0][0] if events else 0.0
    for t, step in events:
        area += level * (t - last)
        level, last = level + step, t
        most = max(most, level)
    extent = (events[-1][0] - events[0][0]) if events else 0.0
    return most, (area / extent if extent > 0 else 0.0)


def coverage(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """The share of ``window`` covered by at least one of ``intervals``."""
    covered, reach = 0.0, window[0]
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, window[1])
        if end > start:
            covered += end - start
            reach = end
    return covered / (window[1] - window[0]) if window[1] > window[0] else 0.0


def busy(spans: list[Span], slots: dict[str, int], window: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Per worker: task seconds over its slots times ``window``, and the share of the window it ran any task."""
    out = {}
    length = window[1] - window[0]
    for worker, n in sorted(slots.items()):
        mine = [(s.start, s.end) for s in spans if s.worker == worker]
        out[worker] = {"slots": n, "tasks": len(mine),
                       "utilisation": round(sum(e - s for s, e in mine) / (n * length), 3) if length > 0 else 0.0,
                       "any_task_running": round(coverage(mine, window), 3)}
    return out


def summary(values: list[float]) -> dict[str, float]:
    """Median, least and most, in tenths."""
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)} if values else {}


def upload_all(store: ObjectStore, source: Path, captures: list[str], scratch: Path, threads: int) -> dict[str, float]:
    """Every capture uploaded (``threads`` at a time, as several providers would), its marker last; per capture,
    the epoch time its marker was written."""
    def one(capture: str) -> tuple[str, float]:
        upload_capture_as(store, source, capture, scratch)
        return capture, time.time()

    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, captures))


def outputs_digest(store: ObjectStore, capture: str) -> str:
    """One digest of a capture's outputs over all stages, read as capture 018's (copies of one capture and one
    configuration must give one digest); a stage without a manifest is named instead."""
    try:
        outputs = outputs_as(store, capture, STAGES)
    except ValueError as e:
        return str(e)
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()


def listing(st: Stack, path: str, key: str) -> list[dict[str, Any]]:
    """Every entry of a paged REST listing (the API answers at most 100 a page)."""
    out: list[dict[str, Any]] = []
    while True:
        page = st.api("GET", path, params={"limit": 100, "offset": len(out)})
        out += page[key]
        if not page[key] or len(out) >= page["total_entries"]:
            return out


def collect(st: Stack, markers: dict[str, float], t0: float) -> dict[str, Any]:
    """Airflow's records of the capture and ingestion runs, reduced to the figures the module doc names."""
    runs = listing(st, "/dags/headavatar_capture/dagRuns", "dag_runs")
    by_capture: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_capture.setdefault(run["conf"].get("id"), []).append(run)
    spans: list[Span] = []
    tries: Counter[str] = Counter()
    weights: dict[str, int] = {}
    per_capture: dict[str, dict[str, Any]] = {}
    leases: dict[str, list[tuple[float, float]]] = {}  # "host:device" -> when it was leased, seconds from t0
    for capture in sorted(markers):
        mine = by_capture.get(capture, [])
        row: dict[str, Any] = {"runs": [r["dag_run_id"] for r in mine], "states": [r["state"] for r in mine]}
        if len(mine) == 1:
            run = mine[0]
            tis = st.task_instances(run["dag_run_id"])
            ends = {ti["task_id"]: _time(ti["end_date"]).timestamp() - t0 for ti in tis if ti["end_date"]}
            for ti in tis:
                tries[f"try {ti['try_number']}"] += 1
                weights[ti["task_id"]] = ti["priority_weight"]
                if ti["start_date"] and ti["end_date"]:
                    upstream = STAGES[STAGES.index(ti["task_id"]) - 1] if ti["task_id"] != STAGES[0] else None
                    queued = _time(ti["queued_when"])
                    spans.append(Span(capture, ti["task_id"], ti["hostname"],
                                      _time(ti["start_date"]).timestamp() - t0, _time(ti["end_date"]).timestamp() - t0,
                                      queued=queued.timestamp() - t0 if queued else None,
                                      ready=ends.get(upstream) if upstream else None, weight=ti["priority_weight"]))
            for ti in tis:
                if ti["task_id"] in GPU_STAGES and ti["state"] == "success":
                    lease = st.return_value(run["dag_run_id"], ti["task_id"])["gpu"]
                    leases.setdefault(f"{lease['host']}:{lease['device']}", []).append(
                        (_time(lease["leased"]).timestamp() - t0, _time(lease["released"]).timestamp() - t0))
            first = min((_time(ti["start_date"]).timestamp() for ti in tis if ti["start_date"]), default=None)
            marker = markers[capture]
            row.update({
                "uploaded_s": round(marker - t0, 1),
                "run_created_after_upload_s": round(_time(run["queued_at"]).timestamp() - marker, 1),
                "first_task_after_upload_s": round(first - marker, 1) if first else None,
                "first_task_s": round(first - t0, 1) if first else None,
                "finished_s": round(_time(run["end_date"]).timestamp() - t0, 1) if run["end_date"] else None,
                "tasks": {ti["task_id"]: {"try": ti["try_number"], "worker": ti["hostname"], "state": ti["state"]}
                          for ti in tis},
            })
        per_capture[capture] = row
    return {"per_capture": per_capture, "spans": spans, "leases": leases, "tries": dict(tries),
            "priority_weight": weights,
            "unexpected_runs": sorted(set(by_capture) - set(markers), key=str)}


def ingestion_record(st: Stack, markers: dict[str, float], all_ended: float) -> dict[str, Any]:
    """Per capture: the ingestion runs that listed it pending, and the trigger tasks that made or skipped its run;
    and what the ingestion runs begun after ``all_ended`` (every capture's run over) listed."""
    runs = listing(st, "/dags/headavatar_ingest/dagRuns", "dag_runs")
    listed: Counter[str] = Counter()
    triggered: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    states = Counter(r["state"] for r in runs)
    listed_after: list[str] = []
    for run in runs:
        tis = listing(st, f"/dags/headavatar_ingest/dagRuns/{run['dag_run_id']}/taskInstances", "task_instances")
        for ti in tis:
            if ti["task_id"] != "trigger_capture_runs" or ti["map_index"] < 0:
                continue
            capture = ti.get("rendered_map_index")
            listed[capture] += 1
            if _time(run["start_date"]).timestamp() > all_ended:
                listed_after.append(capture)
            (triggered if ti["state"] == "success" else skipped)[capture] += 1
    return {"ingestion_runs": len(runs), "ingestion_run_states": dict(states),
            "listed_pending": {c: listed[c] for c in sorted(markers)},
            "runs_triggered": {c: triggered[c] for c in sorted(markers)},
            "triggers_skipped_as_existing": {c: skipped[c] for c in sorted(markers)},
            "runs_after_all_ended": sum(1 for r in runs if r["start_date"] and
                                        _time(r["start_date"]).timestamp() > all_ended),
            "listed_after_all_ended": listed_after}


def bench(args: argparse.Namespace, docker_env: dict[str, str], work: Path) -> dict[str, Any]:
    captures = [f"{args.first_id + i:03d}" for i in range(args.captures)]
    source = write_tiny_capture(work / "source")  # the compose tests' capture
    settings = celery_settings(bridge_address(docker_env), host_gpus=1, gpus=3,
                               HEADAVATAR_INGEST_SCHEDULE="* * * * *",
                               HEADAVATAR_INGEST_PARAMS=json.dumps(RUN_PARAMS))
    with running_stack(docker_env, work / "central", **settings) as st, \
            WorkerHost(st, work, "b", gpu_tasks=2).running():
        os.environ.update(st.admin_s3_env())
        store = ObjectStore(st.storage())
        for dag in ("headavatar_capture", "headavatar_compare", "headavatar_ingest"):
            st.unpause(dag)
        t0 = time.time()
        markers = upload_all(store, source, captures, work / "copies", threads=args.upload_threads)
        print(f"{len(captures)} captures uploaded in {max(markers.values()) - t0:.0f} s", file=sys.stderr)

        def all_finished() -> bool:
            runs = listing(st, "/dags/headavatar_capture/dagRuns", "dag_runs")
            done = [r for r in runs if r["state"] in ("success", "failed")]
            print(f"{time.time() - t0:6.0f} s: {len(runs)} capture runs, {len(done)} ended", file=sys.stderr)
            return len(done) >= len(captures) and len(done) == len(runs)

        wait_for("every capture's run", all_finished, args.timeout_s, interval=30)
        all_ended = time.time()

        def later_ingestion() -> bool:  # one more ingestion run after the last capture ended: nothing to find
            runs = listing(st, "/dags/headavatar_ingest/dagRuns", "dag_runs")
            return any(r["state"] == "success" and _time(r["start_date"]).timestamp() > all_ended for r in runs)

        wait_for("an ingestion run after the last capture", later_ingestion, 300, interval=10)
        record = collect(st, markers, t0)
        ingestion = ingestion_record(st, markers, all_ended)
        digests = Counter(outputs_digest(store, c) for c in captures)
        store.close()

    spans: list[Span] = record.pop("spans")
    rows = record["per_capture"]
    ended = [(r["first_task_s"], r["finished_s"]) for r in rows.values() if r.get("finished_s") is not None]
    window = (min(s.start for s in spans), max(s.end for s in spans))
    last = max(e for _, e in ended)
    most, mean = in_progress(ended)
    return {
        "captures": len(captures), "run_params": RUN_PARAMS, "ingest_schedule": "* * * * *",
        "hosts": {"a": "the central stack's workers: 2 CPU tasks, 1 GPU task (device 0) at a time",
                  "b": "docker-compose.worker.yml: 2 CPU tasks, 2 GPU tasks for its one leased device 0"},
        "upload_window_s": round(max(markers.values()) - t0, 1),
        "ingestion": ingestion,
        "run_created_after_upload_s": summary([r["run_created_after_upload_s"] for r in rows.values()
                                               if "run_created_after_upload_s" in r]),
        "first_task_after_upload_s": summary([r["first_task_after_upload_s"] for r in rows.values()
                                              if r.get("first_task_after_upload_s") is not None]),
        "last_capture_finished_s": round(last, 1),
        "captures_per_hour": round(len(ended) / last * 3600, 2),
        "workers": busy(spans, SLOTS, window),
        # A GPU task holds its worker slot while it waits for its host's device: the leases say when a device
        # was really in use (host b's worker takes two tasks for its one device).
        "gpu_devices_leased": {device: round(coverage(spans_, window), 3)
                               for device, spans_ in sorted(record["leases"].items())},
        "captures_in_progress": {"most": most, "mean": round(mean, 2)},
        "finish_vs_start_order_kendall_tau": round(kendall_tau([s for s, _ in ended], [e for _, e in ended]), 3),
        "capture_first_task_to_end_s": summary([e - s for s, e in ended]),
        "priority_weight": record["priority_weight"],
        "gpu_pool_priority": priority_picks(spans, GPU_STAGES),
        "task_tries": record["tries"],
        "run_states": dict(Counter(state for r in rows.values() for state in r["states"])),
        "runs_per_capture": dict(Counter(len(r["runs"]) for r in rows.values())),
        "distinct_outputs": dict(digests),
        "unexpected_runs": record["unexpected_runs"],
        "per_capture": rows,
        "timeline": [s.__dict__ for s in sorted(spans, key=lambda s: s.start)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captures", type=int, default=20, help="how many captures are uploaded at once")
    ap.add_argument("--first-id", type=int, default=201, help="the first capture's id (the others follow)")
    ap.add_argument("--upload-threads", type=int, default=4, help="uploads at a time")
    ap.add_argument("--timeout-s", type=float, default=4 * 3600, help="how long the runs may take in all")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ingest_load.json")
    args = ap.parse_args(argv)
    with docker_engine_env() as docker_env, tempfile.TemporaryDirectory(prefix="ingest-load-") as tmp:
        result = bench(args, docker_env, Path(tmp))
    stamp(result, "headavatar.bench.ingest_load", argv)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_capture", "timeline")}, indent=1,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
