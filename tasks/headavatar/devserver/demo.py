"""``make demo``: the per-capture DAG end to end on one machine, in containers, on a CPU.

The mission's shape: the embedded services on 127.0.0.1 (SeaweedFS S3 and a real ``mlflow server``,
data under ``.headavatar/demo``), a small synthetic capture 018, and the Airflow DAG
``headavatar_capture`` run with ``airflow dags test`` on the ``docker`` backend: each of the six
tasks is a container of the project's images (``make images``, built on first use), started by
DockerOperator on the project's own Docker engine (started when none answers). ``--backend local``
(``make demo BACKEND=local``) runs the same ``headavatar run`` commands as subprocesses instead.

The console (:mod:`headavatar.devserver.console`) says up front what will happen and about how long
(measured: :func:`estimate`), prints one line per phase and per stage (``cached`` for a cache hit) and a
progress line whenever it has been quiet for 20 s, and ends with the avatar's held-out quality, the
results page (:mod:`headavatar.devserver.demo_report`) and where everything is; Airflow's own output
goes to a log file. Ports and the
S3 key pair are those of ``make demo-ui`` (``state.json`` in the demo home), so the URLs printed
here open once ``make demo-ui`` serves the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headavatar.contract.outputs import RESERVED_PREFIX
from headavatar.contract.stage import read_manifest
from headavatar.devserver.common import BUCKET, REPO, _port, airflow_env, load_state, save_state, write_s3_env
from headavatar.devserver.console import Console, LogTail, duration
from headavatar.devserver.demo_report import quality_line, write_index
from headavatar.devserver.mlflow_server import EmbeddedMLflow
from headavatar.devserver.seaweed import EmbeddedS3, Identity
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

log = logging.getLogger("headavatar.demo")
PICTURE_DIRS = ("overlays/", "renders/")  # the stages' contact sheets (tracking logs the same ones)


def demo_times(backend: str) -> Path:
    """`make demo` timed on a fresh clone (headavatar.bench.demo_times): where the estimate comes from."""
    return REPO / "benchmarks" / "results" / f"demo_times_{backend}.json"


def estimate(backend: str, fresh: bool, speed_s: float | None) -> str:
    """How long this run should take on 2 free cores, from the measured run of this backend (the file
    headavatar.bench.demo_times writes): see :func:`scaled_estimate`."""
    from headavatar.bench.provenance import machine

    path = demo_times(backend)
    if not path.exists():
        return f"No measured time for BACKEND={backend} (no {path.name})"
    return scaled_estimate(json.loads(path.read_text()), fresh, speed_s, machine()["cpu"])


def scaled_estimate(measured: dict[str, Any], fresh: bool, speed_s: float | None, cpu: str) -> str:
    """The measured first or cached run's time; on the CPU model it was measured on, scaled by how fast this
    CPU ran :func:`headavatar.bench.cpu_speed.workload_s` (``speed_s``) against that run. Across models the
    workload does not predict the demo (an AMD EPYC ran it 17-37 % slower than an Intel Xeon and the demo as
    fast as its quick runs: docs/containers.md#measured-times), so there the measured time is given as it is."""
    run = measured["first" if fresh else "later"]
    what = "first run" if fresh else "data and images are cached"
    there = run.get("cpu_workload_s") or measured["first"].get("cpu_workload_s")
    where, commit = measured.get("machine", {}).get("cpu", ""), measured["commit"][:8]
    if not where or cpu != where:
        return (f"About {duration(run['demo_s'])} on 2 free cores ({what}; measured at {commit} "
                f"on {where or 'an unrecorded CPU'})")
    ratio = min(max(speed_s / there, 0.25), 4.0) if speed_s and there else 1.0
    scaled = f", x{ratio:.2f} for this CPU's speed" if speed_s and there else ""
    return (f"About {duration(run['demo_s'] * ratio)} on 2 free cores ({what}; {duration(run['demo_s'])} "
            f"measured at {commit}{scaled})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", default="018")
    parser.add_argument("--home", type=Path, default=Path(".headavatar/demo"))
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--layout", choices=("v1", "v2"), default="v2",
                        help="raw layout of the synthetic capture: v2 (as `nersemble-data download` gives it, "
                             "colour-calibrated; default) or v1")
    parser.add_argument("--backend", choices=["docker", "local"],
                        default=os.environ.get("BACKEND") or "docker",
                        help="docker (default): every task a container; local: subprocesses of Airflow")
    parser.add_argument("--serve", action="store_true", help="only serve the demo's S3 + MLflow until Ctrl-C")
    parser.add_argument("--stage-image", help="image of stages 3-6 on the docker backend, run without a GPU "
                                              "(default: headavatar/cpu; make smoke-cuda: headavatar/cuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))  # stop the servers on SIGTERM too

    home = args.home.resolve()
    console = Console(home / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log")
    try:
        with contextlib.ExitStack() as stack:
            return _demo(args, home, console, stack)
    finally:
        console.close()


def _demo(args: argparse.Namespace, home: Path, console: Console, stack: contextlib.ExitStack) -> int:
    t0 = time.monotonic()
    fresh = not (home / "summary.json").exists()
    speed_s = None
    if not args.serve:
        from headavatar.bench.cpu_speed import workload_s

        speed_s = workload_s()
        console.say(f"""headavatar demo: NeRSemble-style capture -> Gaussian head avatar, on this machine's CPU.
  1. start S3 (SeaweedFS) and MLflow on 127.0.0.1, write a synthetic capture {args.capture}
     (NeRSemble {args.layout} layout, 16 cameras, 2 sequences x {args.frames} frames, 256x372)
  2. {'meanwhile, start the Docker engine and build the stage images (first time only)'
      if args.backend == 'docker' else 'no containers (BACKEND=local): stages run as subprocesses of Airflow'}
  3. run the Airflow DAG headavatar_capture: {' -> '.join(STAGE_NAMES)}
     ({'each task a container' if args.backend == 'docker' else 'local backend'}; demo profile: tiny models)
  4. copy each stage's pictures out and print where the runs, the model and the UIs are
{estimate(args.backend, fresh, speed_s)}; longer if other work shares the CPU.
Full log: {console.logfile}
""")
    state = load_state(home)
    with console.phase("servers", "S3 + MLflow servers on 127.0.0.1"):
        ports = state["ports"]
        ports["s3"] = _port(state, "s3")
        admin = Identity("admin", ["Admin"], access_key=state["s3_access_key"], secret_key=state["s3_secret_key"])
        s3 = EmbeddedS3(home / "s3", identities=[admin], s3_port=ports["s3"]).start()
        stack.callback(s3.stop)
        write_s3_env(home, s3.env())
        mlflow = EmbeddedMLflow(home / "mlflow", s3.env(), BUCKET)
        mlflow.port = ports["mlflow"] = _port(state, "mlflow")
        stack.callback(mlflow.stop)
        mlflow.start(timeout=300)  # its first start migrates the database: slow on a busy 2-core machine
        save_state(home, state)
    env = {**os.environ, **s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET}
    if args.serve:
        return _serve(mlflow.uri, s3.endpoint_url)
    synth = _start_capture(args, env, console.logfile)  # in the background, while the images build
    if synth is not None:
        stack.callback(_stop, synth)
    docker_host = None
    if args.backend == "docker":
        from headavatar.devserver.docker_engine import DockerEngine
        from headavatar.devserver.images import build_images

        engine = DockerEngine(REPO / ".headavatar" / "docker")
        with console.phase("engine", "Docker engine"):
            _quietly(console.logfile, engine.start)
            stack.callback(engine.stop)  # only if this run started it
        build = LogTail(console.logfile, r"Step (\d+)/(\d+) : (.{0,50})",
                        lambda m: f"image build: step {m[1]}/{m[2]}: {m[3]}")
        with console.phase("images", "stage images (built on first use, then cached)", build):
            _quietly(console.logfile, lambda: build_images(env=engine.env()))
        docker_host = engine.url
    with console.phase("capture", f"synthetic capture {args.capture}" + (
            " (in the bucket)" if synth is None else " (written meanwhile)" if args.backend == "docker" else "")):
        if synth is not None and synth.wait() != 0:
            raise subprocess.CalledProcessError(synth.returncode, synth.args)
    return _run(args, home, env, mlflow.uri, console, docker_host, t0, speed_s)


def _start_capture(args: argparse.Namespace, env: dict[str, str], logfile: Path) -> subprocess.Popen | None:
    """Start writing the synthetic capture into the bucket; None when it is there already."""
    cli = [sys.executable, "-m", "headavatar.cli"]
    have = subprocess.run([*cli, "captures"], env=env, capture_output=True, text=True)
    captures = json.loads(have.stdout.strip().splitlines()[-1]) if have.returncode == 0 and have.stdout else []
    if args.capture in captures:
        return None
    with open(logfile, "ab") as logf:  # synth creates the bucket if needed
        return subprocess.Popen([*cli, "synth", "--capture", args.capture, "--width", "256", "--height", "372",
                                 "--frames", str(args.frames), "--sequence", "EXP-1-head", "--sequence", "EXP-2-eyes",
                                 "--layout", args.layout], env=env, stdout=logf, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _quietly(logfile: Path, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with this process's stdout/stderr (and its children's) appended to the log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(logfile, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            return fn()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _run(args: argparse.Namespace, home: Path, env: dict[str, str], mlflow_uri: str, console: Console,
         docker_host: str | None, t0: float, speed_s: float | None) -> int:
    with open(console.logfile, "ab") as logf:
        af_home = home / "airflow"
        af = {**env, **airflow_env(af_home, env, mlflow_uri, args.backend, docker_host, args.stage_image)}
        airflow = [sys.executable, "-m", "airflow"]
        with console.phase("airflow", "Airflow metadata database"):
            subprocess.run([*airflow, "db", "migrate"], env=af, check=True, stdout=logf, stderr=subprocess.STDOUT)
        conf = json.dumps({"id": args.capture, "profile": "demo"})
        console.say(f"  DAG headavatar_capture {conf} on the {args.backend} backend:")
        db = af_home / "airflow.db"
        last_run = _last_run_id(db)
        t_dag = time.monotonic()
        dag = subprocess.Popen([*airflow, "dags", "test", "headavatar_capture", "--conf", conf], env=af,
                               stdout=logf, stderr=subprocess.STDOUT)
        monitor = _StageMonitor(db, last_run, console)
        monitor.start()
        try:
            rc = dag.wait()
        finally:  # the demo stopped by a signal: Airflow (and the task it runs) with it, not left behind
            _stop(dag)
            monitor.stop()
        console.phases["dag"] = time.monotonic() - t_dag

    os.environ.update(env)
    store = ObjectStore(load_config().storage)
    try:
        done = {s: read_manifest(store, args.capture, s) is not None for s in STAGE_NAMES}
        if rc != 0 or not all(done.values()):
            console.say(f"\nThe DAG run failed (exit {rc}); stages done: {[s for s, ok in done.items() if ok]}.")
            console.say(f"Airflow's output, with each task's log: {console.logfile}")
            return rc or 1
        run = _mlflow_run(mlflow_uri, args.capture, monitor.run_id)
        with console.phase("export", f"copy pictures to {home / 'output' / args.capture}"):
            pictures, index, stage_metrics, protocol = export_results(store, args.capture,
                                                                      home / "output" / args.capture, run)
        outputs = {s: store.uri(store.key(stage_prefix(args.capture, s))) + "/" for s in STAGE_NAMES}
        avatar = stage_metrics[STAGE_NAMES[-1]]
        quality = quality_line(avatar, protocol)
        metrics = {k: v for k, v in avatar.items() if k.startswith(("holdout_", "novel_view_", "self_reenactment_"))}
    finally:
        store.close()
    summary = {"capture": args.capture, "backend": args.backend, "seconds": round(time.monotonic() - t0, 1),
               "phases": {k: round(v, 1) for k, v in console.phases.items()},
               "stages": {s: round(v, 1) for s, v in monitor.durations.items()},
               "outputs": outputs, "pictures": {s: str(p) for s, p in pictures.items()}, "mlflow": run,
               "airflow_run_id": monitor.run_id, "log": str(console.logfile), "quality": quality, "metrics": metrics,
               "index": str(index), "cpu_workload_s": speed_s}
    (home / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(console, summary, pictures, home)
    return 0


def _print_summary(console: Console, s: dict[str, Any], pictures: dict[str, Path], home: Path) -> None:
    phases = ", ".join(f"{k} {duration(v)}" for k, v in s["phases"].items())
    console.say(f"\nDone in {duration(s['seconds'])} ({phases}).")
    console.say("Pictures of each stage (copied from the bucket; the outputs stay under s3://"
                f"{BUCKET}/.../avatars/{s['capture']}/<stage>/):")
    for stage, folder in pictures.items():
        n = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
        console.say(f"  {stage:<13} {folder}  ({n} files)" if n else f"  {stage:<13} (no pictures: "
                    f"{s['outputs'][stage]})")
    m = s["mlflow"]
    console.say(f"Avatar quality {s['quality']}")
    console.say(f"Results page   file://{s['index']}  (pictures labelled, scores, videos, MLflow links)")
    console.say(f"MLflow run     {m['run']}: {m['url']}")
    console.say(f"Avatar model   {m['registered_model']} version {m['version']}: {m['model_url']}")
    console.say(f"Airflow run    headavatar_capture / {s['airflow_run_id']}")
    console.say("Open them:     make demo-ui   (serves this data again: the Airflow UI, and MLflow at the URLs above;"
                " Ctrl-C stops it)")
    console.say(f"Summary JSON   {home / 'summary.json'}")


class _StageMonitor(threading.Thread):
    """One console line per task of the new DAG run, read from Airflow's metadata DB (SQLite)."""

    def __init__(self, db: Path, after_run: int, console: Console):
        super().__init__(daemon=True)
        self.db, self.after_run, self.console = db, after_run, console
        self.run_id: str | None = None
        self.durations: dict[str, float] = {}
        self._halt = threading.Event()
        self._printed: set[str] = set()
        self._running: dict[str, tuple[float, LogTail]] = {}  # stage -> (seen running since, its progress lines)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self._poll()  # the last task's line

    def run(self) -> None:
        while not self._halt.wait(1.0):
            with contextlib.suppress(sqlite3.Error):
                self._poll()

    def _poll(self) -> None:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)) as con:
            row = con.execute("select id, run_id from dag_run where dag_id = 'headavatar_capture' and id > ? "
                              "order by id limit 1", (self.after_run,)).fetchone()
            if row is None:
                return
            self.run_id = row[1]
            tasks = {r[0]: r[1:] for r in con.execute(
                "select task_id, state, start_date, end_date, try_number from task_instance "
                "where dag_id = 'headavatar_capture' and run_id = ?", (self.run_id,))}
            results = {r[0]: r[1] for r in con.execute(
                "select task_id, value from xcom where dag_id = 'headavatar_capture' and run_id = ? "
                "and key = 'return_value'", (self.run_id,))}
        for i, stage in enumerate(STAGE_NAMES, 1):
            state, start, end, tries = tasks.get(stage, (None, None, None, 0))
            if state == "running":
                self._heartbeat(i, stage)
            if state == "up_for_retry" and f"{stage}/{tries}" not in self._printed:
                self._printed.add(f"{stage}/{tries}")
                self.console.say(f"    [{i}/{len(STAGE_NAMES)}] {stage:<13} try {tries} failed, retrying (see the log)")
            if stage in self._printed or state not in ("success", "failed", "upstream_failed", "skipped"):
                continue
            seconds = _seconds(start, end)
            if seconds is not None:
                self.durations[stage] = seconds
            took = duration(seconds) if seconds is not None else "-"
            retry = f" (try {tries})" if tries and tries > 1 else ""
            shown = "cached" if state == "success" and _cached(results.get(stage)) else state
            self.console.say(f"    [{i}/{len(STAGE_NAMES)}] {stage:<13} {shown:<16}{took:>10}{retry}")
            self._printed.add(stage)


    def _heartbeat(self, i: int, stage: str) -> None:
        """A line for a running stage when the console has been quiet: its training progress, else its time."""
        if stage not in self._running:
            self._running[stage] = time.monotonic(), LogTail(
                self.console.logfile, rf"\b{stage}: step (\d+)/(\d+) .*about (.+) left\)",
                lambda m: f"step {m[1]}/{m[2]}, about {m[3]} left")
        if self.console.quiet_for() >= self.console.quiet_s:
            since, progress = self._running[stage]
            self.console.note(f"    [{i}/{len(STAGE_NAMES)}] {stage:<13} {progress.latest() or 'running'} "
                              f"({duration(time.monotonic() - since)})")


def _cached(value: Any) -> bool:
    """Whether a stage task's result (its XCom: the CLI's result file) says the stage was a cache hit."""
    for _ in range(2):  # the JSON column may hold the result or the result encoded once more as a string
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError:
                return False
    return isinstance(value, dict) and value.get("cached") is True


def _seconds(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


def _last_run_id(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        row = con.execute("select max(id) from dag_run").fetchone()
    return int(row[0] or 0)


def _mlflow_run(uri: str, capture: str, airflow_run_id: str | None) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    from headavatar.tracking import experiment_name, model_name

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name())
    of_run = f" and tags.`airflow.run_id` = '{airflow_run_id}'" if airflow_run_id else ""
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'pipeline' and tags.`headavatar.capture` = '{capture}'{of_run}"),
        order_by=["attributes.start_time DESC"], max_results=1)
    versions = client.search_model_versions(f"name = '{model_name(capture)}'")
    latest = max((int(v.version) for v in versions), default=0)
    parent = runs[0].info.run_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    run_url = f"{uri}/#/experiments/{exp.experiment_id}/runs/"
    return {"run": runs[0].info.run_name, "run_id": parent, "experiment_id": exp.experiment_id,
            "url": run_url + parent, "registered_model": model_name(capture), "version": str(latest),
            "model_url": f"{uri}/#/models/{model_name(capture)}/versions/{latest}",
            "stages": {c.data.tags.get("headavatar.stage"): run_url + c.info.run_id for c in children}}


def _serve(mlflow_uri: str, s3_url: str) -> int:
    print(json.dumps({"mlflow_ui": mlflow_uri, "s3_endpoint": s3_url, "stop": "Ctrl-C"}, indent=1), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def export_results(store: ObjectStore, capture: str, dest: Path, mlflow: dict[str, Any]
                   ) -> tuple[dict[str, Path], Path, dict[str, dict[str, Any]], str | None]:
    """Each stage's pictures (the last stage's whole output) into ``dest/<stage>/``, and ``dest/index.html``;
    returns the folders, the page, each stage's manifest metrics and the avatar's evaluation protocol."""
    pictures = {s: export(store, capture, s, dest / s, everything=s == STAGE_NAMES[-1]) for s in STAGE_NAMES}
    metrics = {s: m.metrics for s in STAGE_NAMES if (m := read_manifest(store, capture, s)) is not None}
    protocol = _protocol(dest)
    return pictures, write_index(dest, capture, metrics, mlflow, protocol), metrics, protocol


def _protocol(dest: Path) -> str | None:
    """The evaluation protocol the avatar's scores were measured under (its ``avatar.json``)."""
    path = dest / STAGE_NAMES[-1] / "avatar" / "avatar.json"
    return json.loads(path.read_text()).get("eval_protocol") if path.exists() else None


def export(store: ObjectStore, capture: str, stage: str, dest: Path, everything: bool = False) -> Path:
    """Copy a stage's pictures (``overlays/``, ``renders/``), or all its outputs, to a local folder."""
    prefix = store.key(stage_prefix(capture, stage))
    rels = ((o.key, o.key[len(prefix) + 1:]) for o in store.list(prefix))
    store.download_many((key, dest / rel) for key, rel in rels if not rel.startswith(RESERVED_PREFIX)
                        and (everything or rel.startswith(PICTURE_DIRS)))
    return dest


if __name__ == "__main__":
    sys.exit(main())
