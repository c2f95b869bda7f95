"""The Airflow layer, against real Airflow: DAG parsing, operator backends, a DAG run, ingestion."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import upload_capture, zip_capture
from headavatar.capture_id import CAPTURE_ID_PATTERN
from headavatar.cli import build_parser
from headavatar.contract.manifest import Manifest
from headavatar.contract.stage import manifest_key
from headavatar.devserver.demo import _last_run_id, _mlflow_run, export_results
from headavatar.storage import ObjectStore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from headavatar_airflow.pipeline import CAPTURE_ID_PATTERN as DAG_PATTERN  # noqa: E402
from headavatar_airflow.pipeline import PARAM_DEFAULTS, STAGES, cli_args  # noqa: E402


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("airflow")
    r = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=_env(home, {}), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return home


def _env(home: Path, s3_env: dict[str, str], backend: str = "local") -> dict[str, str]:
    import os

    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "HEADAVATAR_EXECUTION": backend, "PYTHONPATH": f"{REPO / 'plugins'}:{REPO / 'tasks'}"}
    if s3_env:
        env["AIRFLOW_CONN_HEADAVATAR_S3"] = json.dumps({
            "conn_type": "aws", "login": s3_env["AWS_ACCESS_KEY_ID"], "password": s3_env["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3_env["HEADAVATAR_S3_ENDPOINT"], "bucket": s3_env["HEADAVATAR_S3_BUCKET"],
                      "prefix": s3_env["HEADAVATAR_S3_PREFIX"], "region_name": "us-east-1"}})
    return env


def _python(home: Path, code: str, backend: str = "local") -> dict:
    """Run code in a fresh interpreter configured for this Airflow home; it prints one JSON line."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(home, {}, backend),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _airflow(home: Path, env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow", *args], env={**_env(home, {}), **env},
                          capture_output=True, text=True, timeout=timeout)


def _runs(home: Path) -> list[dict]:
    """The runs of headavatar_capture in this Airflow home (run_id, state), read from its SQLite database:
    `airflow dags list-runs` would start an interpreter that imports Airflow, seconds a call."""
    with contextlib.closing(sqlite3.connect(home / "airflow.db", timeout=60)) as db:
        rows = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = 'headavatar_capture'").fetchall()
    return [{"run_id": run_id, "state": state} for run_id, state in rows]


# The DAG run of tiny capture 018 on the local backend: the plumbing profile and short training.
LOCAL_RUN = {"id": "018", "profile": "ci", "meshhead_steps": 20, "gaussianhead_steps": 20}
LOAD = """
    import json
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag()
    dag = bag.dags["headavatar_capture"]
"""


def test_dags_parse_and_declare_six_retried_stages(airflow_home: Path) -> None:
    facts = _python(airflow_home, LOAD + """
    import jsonschema
    from airflow import plugins_manager
    from airflow.sdk.definitions.param import Param
    from headavatar_airflow.plain_refusals import plain
    schema = {k: v.schema for k, v in dag.params.items()}
    rejected, sentences = [], []
    for bad in ["../018", "018;rm", "018/..", "", "x" * 200, "ü018", "-018"]:
        try:
            Param(bad, **schema["id"]).resolve()
        except Exception:
            rejected.append(bad)
        try:  # what the API server's own check raises, worded as it words it
            jsonschema.validate(bad, schema["id"], format_checker=jsonschema.FormatChecker())
        except jsonschema.ValidationError as e:
            sentences.append(plain(f"Invalid input for param id: {e}"))
    try:
        jsonschema.validate(0, schema["sample_stride"])
    except jsonschema.ValidationError as e:
        sentences.append(plain(f"Invalid input for param sample_stride: {e}"))
    print(json.dumps({
        "errors": bag.import_errors and {k: str(v)[:300] for k, v in bag.import_errors.items()},
        "dags": sorted(bag.dags),
        "order": [t.task_id for t in dag.topological_sort()],
        "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
        "pools": {t.task_id: t.pool for t in dag.tasks},
        "retries": {t.task_id: [t.retries, t.retry_exponential_backoff] for t in dag.tasks},
        "types": sorted({type(t).__name__ for t in dag.tasks}),
        "id_pattern": schema["id"]["pattern"], "rejected": rejected,
        "ok": Param("018", **schema["id"]).resolve(), "sentences": sentences,
        "middlewares": [m["name"] for m in plugins_manager.get_fastapi_plugins()[1]],
    }))
    """)
    assert not facts["errors"], facts["errors"]
    assert facts["dags"] == ["headavatar_capture", "headavatar_compare", "headavatar_ingest"]
    names = [s.name for s in STAGES]
    assert facts["order"] == names
    assert facts["upstream"] == {n: ([names[i - 1]] if i else []) for i, n in enumerate(names)}
    assert {t: p for t, p in facts["pools"].items() if p == "headavatar_gpu"} == {
        n: "headavatar_gpu" for n in ("matting", "fitting", "meshhead", "gaussianhead")}
    assert all(r == [3, True] for r in facts["retries"].values())
    assert facts["types"] == ["LocalStageOperator"]
    assert facts["id_pattern"] == DAG_PATTERN == CAPTURE_ID_PATTERN
    assert len(facts["rejected"]) == 7 and facts["ok"] == "018"
    # The API server loads the plugin that words a refusal as one sentence instead of the schema dump.
    assert facts["middlewares"] == ["plain parameter refusals"]
    rule = "use the capture's name as it is in the bucket, such as 018: letters, digits, '_' and '-', " \
           "starting with a letter or digit, at most 64 characters."
    assert facts["sentences"][0] == f"Capture id '../018' is not valid: {rule}"
    assert facts["sentences"][3] == f"Capture id '' is not valid: {rule}"
    assert all(s.endswith(rule) and "\n" not in s for s in facts["sentences"][:7]), facts["sentences"]
    assert facts["sentences"][7] == "Sample stride: 0 is less than the minimum of 1."
    ingest = _python(airflow_home, LOAD.replace('"headavatar_capture"', '"headavatar_ingest"') + """
    print(json.dumps({t.task_id: [type(t).__name__, sorted(t.upstream_task_ids), str(t.trigger_rule.value)]
                      for t in dag.tasks}))
    """)
    # Unpacking runs on the stages' backend, as its own task; the listing runs whatever its outcome.
    assert ingest["unpack"][:2] == ["LocalStageOperator", []]
    assert ingest["find_pending_captures"][1:] == [["unpack"], "all_done"]


def test_every_command_the_dag_sends_is_one_the_stage_cli_accepts() -> None:
    params = {**PARAM_DEFAULTS, "id": "018", "profile": "demo", "sample_stride": 5, "meshhead_steps": 100,
              "gaussianhead_steps": 50, "gpu": 1, "force": True}
    for stage in STAGES:
        args = build_parser().parse_args(cli_args(stage.name, params, "manual__2026-12-07T19:00:00+00:00"))
        assert (args.command, args.stage, args.capture, args.profile, args.force, args.force_run) == (
            "run", stage.name, "018", "demo", False, "manual__2026-12-07T19:00:00+00:00")  # forced once per run
        assert args.overrides == ["sample.frame_stride=5", "meshhead.steps=100", "gaussianhead.steps=50"]
        assert build_parser().parse_args(cli_args(stage.name, params)).force  # no run: forced every time


@pytest.mark.parametrize("backend", ["docker", "kubernetes"])
def test_production_backends_isolate_stages_and_request_gpus(airflow_home: Path, backend: str) -> None:
    facts = _python(airflow_home, LOAD + """
    out = {}
    for t in dag.tasks:
        d = {"type": type(t).__name__, "image": t.image, "links": [link.name for link in t.operator_extra_links],
             "queue": t.queue}
        if hasattr(t, "auto_remove"):
            d.update(auto_remove=t.auto_remove, mounts=t.mounts, tmp=t.mount_tmp_dir, privileged=t.privileged,
                     env=t.environment, private=t._private_environment)
        else:
            r = t.container_resources
            d.update(cmds=t.cmds, gpus=(r.limits or {}).get("nvidia.com/gpu") if r else None,
                     selector=t.node_selector, tolerations=len(t.tolerations or []),
                     secret=[e.secret_ref.name for e in t.env_from if e.secret_ref],
                     settings=[e.config_map_ref.name for e in t.env_from if e.config_map_ref],
                     finish=str(t.on_finish_action), non_root=t.security_context.run_as_non_root,
                     seccomp=t.security_context.seccomp_profile.type,
                     escalation=t.container_security_context.allow_privilege_escalation,
                     env=[e.name for e in t.env_vars])
        out[t.task_id] = d
    print(json.dumps(out, default=str))
    """, backend=backend)
    for stage in STAGES:
        t = facts[stage.name]
        assert t["image"] == ("headavatar/cuda:0.1.0" if stage.gpu else "headavatar/preprocess:0.1.0")
        assert t["links"] == ["MLflow run"]
        # Celery routes GPU stages to the GPU hosts' workers (docs/deploy-multi-host.md); the rest to the default.
        assert t["queue"] == ("gpu" if stage.gpu else "default")
        if backend == "docker":
            # removed by the operator itself once its exit code and result file are read (tests/test_docker_backend.py
            # checks that no container is left behind)
            assert t["type"] == "DockerStageOperator" and t["auto_remove"] == "never"
            assert t["mounts"] == [] and t["tmp"] is False and t["privileged"] is False
            # secrets only at run time; OpenMP threads that sleep while they wait (operators.CONTAINER_ENV)
            assert t["env"] == {"PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"} and not t["private"]
        else:
            assert t["type"] == "KubernetesStageOperator" and t["cmds"] == ["headavatar"]
            assert t["secret"] == ["headavatar-s3"] and t["settings"] == ["headavatar-settings"]
            assert t["non_root"] is True and t["seccomp"] == "RuntimeDefault" and t["escalation"] is False
            assert "DELETE_POD" in t["finish"].upper()
            assert t["gpus"] == ("1" if stage.gpu else None) and t["tolerations"] == (1 if stage.gpu else 0)
            assert not any("SECRET" in name or "KEY" in name for name in t["env"])


@pytest.fixture
def uploaded(store: ObjectStore, tiny_capture: Path) -> Iterator[ObjectStore]:
    upload_capture(store, tiny_capture)
    yield store


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two DAG runs: ~15 min on 2 cores shared with other work, past the default 900 s
def test_triggered_run_executes_all_six_stages_and_a_rerun_hits_the_cache(
        airflow_home: Path, uploaded: ObjectStore, s3_env: dict[str, str], mlflow_server: str,
        local_dag_runs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = f"{s3_env['HEADAVATAR_S3_PREFIX']}-avatar-"
    env = {"AIRFLOW_CONN_HEADAVATAR_S3": _env(airflow_home, s3_env)["AIRFLOW_CONN_HEADAVATAR_S3"],
           "AIRFLOW_CONN_HEADAVATAR_MLFLOW": json.dumps({"conn_type": "http", "extra": {
               "tracking_uri": mlflow_server, "ui_url": "https://mlflow.example.org/"}}),
           "HEADAVATAR_MLFLOW_MODEL_PREFIX": models}
    conf = json.dumps(LOCAL_RUN)
    db = airflow_home / "airflow.db"
    before_first = _last_run_id(db)
    # The first run has the form's Recompute ticked (its outputs are the same: nothing was there to reuse).
    first = _airflow(airflow_home, env, "dags", "test", "headavatar_capture", "--conf",
                     json.dumps({**LOCAL_RUN, "force": True}))
    log = first.stdout + first.stderr
    names = [s.name for s in STAGES]
    for stage in names:
        assert read(uploaded, stage) is not None, log[-3000:]
    local_dag_runs[conf] = s3_env["HEADAVATAR_S3_PREFIX"]  # tests/test_docker_backend.py compares with it
    # The form's overrides reached the stages' config.
    assert read(uploaded, "meshhead").config["meshhead"]["steps"] == 20
    assert read(uploaded, "gaussianhead").config["gaussianhead"]["steps"] == 20
    manual = [x for x in _runs(airflow_home) if x["run_id"].startswith("manual__")]
    assert [x["state"] for x in manual] == ["success"]
    # Recompute forces once per DAG run: every stage was forced by this run's id, under which its retries resume.
    assert {read(uploaded, stage).forced_by for stage in names} == {manual[0]["run_id"]}

    # MLflow: one parent run for the DAG run, one child per stage, with metrics, curves and pictures.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("headavatar")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's UI: training runs, not GenAI
    parents = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'pipeline' and tags.`airflow.run_id` = '{manual[0]['run_id']}'"))
    assert len(parents) == 1 and parents[0].data.tags["airflow.dag_id"] == "headavatar_capture"
    children = {c.data.tags["headavatar.stage"]: c for c in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")}
    assert sorted(children) == sorted(names)
    gh = children["gaussianhead"]
    assert gh.data.metrics["holdout_psnr"] == read(uploaded, "gaussianhead").metrics["holdout_psnr"]
    # The parent run carries the avatar's held-out metrics and each stage's time (MLflow's compare view).
    parent = client.get_run(parents[0].info.run_id).data.metrics
    assert {k: parent[k] for k in gh.data.metrics if k.startswith("holdout_")} == {
        k: v for k, v in gh.data.metrics.items() if k.startswith("holdout_")} != {}
    assert sorted(k for k in parent if k.endswith("_wall_time_s")) == sorted(f"{s}_wall_time_s" for s in names)
    assert gh.data.tags["airflow.try_number"] == "1"
    curve = client.get_metric_history(children["meshhead"].info.run_id, "train/loss")
    assert [m.step for m in curve] == [10, 20]
    assert [a.path for a in client.list_artifacts(gh.info.run_id, "pictures/renders")] == [
        "pictures/renders/0000.jpg", "pictures/renders/0012.jpg"]
    # Each task links to its child run (the "MLflow run" extra link, stored as XCom by the worker).
    links = _python(airflow_home, f"""
        import json
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        with create_session() as s:
            rows = s.query(XComModel).filter_by(run_id={manual[0]['run_id']!r}, key="_link_MLflowRunLink").all()
            print(json.dumps({{r.task_id: r.value for r in rows}}))
    """)
    assert {k: json.loads(v) if v.startswith('"') else v for k, v in links.items()} == {
        stage: f"https://mlflow.example.org/#/experiments/{exp.experiment_id}/runs/{children[stage].info.run_id}"
        for stage in names}
    version = client.search_model_versions(f"name = '{models}018'")
    assert [(v.version, v.run_id) for v in version] == [("1", gh.info.run_id)]
    # The finished avatar updated the Asset that schedules headavatar_compare, saying which capture it was.
    events = _python(airflow_home, f"""
        import json
        from airflow.models.asset import AssetEvent, AssetModel
        from airflow.utils.session import create_session
        with create_session() as s:
            rows = (s.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                    .filter(AssetModel.name == "headavatar_avatar")
                    .filter(AssetEvent.source_run_id == {manual[0]['run_id']!r}))
            print(json.dumps([[r.source_task_id, r.extra] for r in rows]))
    """)
    assert [[t, e["capture"], e["cached"]] for t, e in events] == [["gaussianhead", "018", False]], events

    # `make demo`'s results page, from this run's outputs and MLflow runs: labelled pictures that exist,
    # the avatar's held-out scores with their protocol, its videos, links to the runs and the model.
    monkeypatch.setenv("HEADAVATAR_MLFLOW_MODEL_PREFIX", models)
    found = _mlflow_run(mlflow_server, "018", manual[0]["run_id"])
    assert (found["run_id"], found["version"]) == (parents[0].info.run_id, "1")
    index = export_results(uploaded, "018", tmp_path / "output", found)[1]
    page = index.read_text()
    assert f"PSNR {read(uploaded, 'gaussianhead').metrics['holdout_psnr']:.2f} dB" in page
    assert "(protocol headavatar-eval/1)" in page
    for label in ("ground truth", "avatar render", "difference x4", "mesh-head render", "normals"):
        assert f"<span>{label}</span>" in page, label
    sources = re.findall(r"src='([^']+)'", page)
    assert all((index.parent / src).is_file() for src in sources), sources
    assert {Path(src).parts[0] for src in sources if src.endswith(".jpg")} == {"matting", "fitting", "meshhead",
                                                                             "gaussianhead"}
    assert sorted(src for src in sources if src.endswith(".mp4")) == [
        "gaussianhead/videos/reenactment.mp4", "gaussianhead/videos/turntable.mp4"]
    for run in [*parents, *children.values()]:
        if run.data.tags.get("headavatar.stage") not in ("extract", "sample"):  # stages without pictures
            assert run.info.run_id in page, run.data.tags
    assert f"/#/models/{models}018/versions/1" in page
    assert "href='gaussianhead/viewer/avatar.html'" in page  # the animated avatar, downloaded with the rest
    assert (index.parent / "gaussianhead" / "viewer" / "avatar.html").is_file()

    # A second run (what clearing a task and its downstream amounts to), Recompute not ticked: every stage is a
    # cache hit, of the forced run's results.
    before_second = _last_run_id(db)
    second = _airflow(airflow_home, env, "dags", "test", "headavatar_capture", "--conf", conf)
    log2 = second.stdout + second.stderr
    for stage in names:
        assert f"018/{stage}: cache hit" in log2, log2[-3000:]
    # `make demo`'s console, read off this Airflow's database: "success" for work done, "cached" for a hit.
    assert _demo_console(db, before_first, tmp_path / "first.log") == ["success"] * len(names)
    assert _demo_console(db, before_second, tmp_path / "second.log") == ["cached"] * len(names)
    assert len(client.search_model_versions(f"name = '{models}018'")) == 1  # the same avatar: no new version
    # A bad id never reaches a stage: the form's schema rejects it before any task runs.
    before = len(_runs(airflow_home))
    bad = _airflow(airflow_home, env, "dags", "test", "headavatar_capture", "--conf", json.dumps({"id": "../018"}))
    assert bad.returncode != 0 and "../018" in bad.stdout + bad.stderr
    assert len(_runs(airflow_home)) == before
    # The S3 secret key appears nowhere a person can read: task logs, MLflow params and tags, manifests.
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in log and secret not in log2
    assert not any(secret in p.read_text(errors="ignore") for p in (airflow_home / "logs").rglob("*") if p.is_file())
    for run in [*parents, *children.values()]:
        assert secret not in json.dumps({"params": run.data.params, "tags": run.data.tags})
    for stage in names:
        assert secret not in uploaded.get_bytes(manifest_key(uploaded, "018", stage)).decode()


def _demo_console(db: Path, after_run: int, logfile: Path) -> list[str]:
    """The state column of the lines ``make demo`` prints for the first DAG run after ``after_run``."""
    from headavatar.devserver.demo import Console, _StageMonitor

    console = Console(logfile)
    _StageMonitor(db, after_run, console)._poll()
    console.close()
    return [line.split()[2] for line in logfile.read_text().splitlines()]


def read(store: ObjectStore, stage: str) -> Manifest | None:
    from headavatar.contract.stage import read_manifest

    return read_manifest(store, "018", stage)


@pytest.mark.s3
def test_ingestion_triggers_one_run_per_pending_capture(airflow_home: Path, store: ObjectStore, tiny_capture: Path,
                                                        s3_env: dict[str, str], tmp_path: Path) -> None:
    upload_capture(store, tiny_capture)  # 018: complete, never run
    raw = store.key("raw")
    for o in store.list(raw):  # 019: every file there, but no _COMPLETE marker: the upload may go on
        if "/018/" in o.key and not o.key.endswith("/_COMPLETE"):  # (finished captures: tests/test_ingest.py)
            store.copy(o.key, o.key.replace("/018/", "/019/"))
    zip_capture(tiny_capture / "raw", "020", tmp_path / "zips")  # 020: delivered as NeRSemble archives
    for z in (tmp_path / "zips").glob("*.zip"):
        store.upload_file(z, f"{raw}/{z.name}")
    store.put_bytes(f"{raw}/camera_params/020/_COMPLETE", b"")  # ... then marked complete
    store.put_bytes(f"{raw}/camera_params/021/camera_params.json", b"{}")  # 021: upload not finished
    store.put_bytes(f"{raw}/camera_params/bad..id/camera_params.json", b"{}")
    env = {"AIRFLOW_CONN_HEADAVATAR_S3": _env(airflow_home, s3_env)["AIRFLOW_CONN_HEADAVATAR_S3"]}
    r = _airflow(airflow_home, env, "dags", "test", "headavatar_ingest")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs = _runs(airflow_home)
    ingested = {x["run_id"] for x in runs if x["run_id"].startswith("ingest__")}
    assert {r.rsplit("__", 1)[0] for r in ingested} == {"ingest__018", "ingest__020"}  # ingest__<id>__<raw digest>
    assert all(re.fullmatch(r"ingest__\d{3}__[0-9a-f]{12}", r) for r in ingested), ingested
    with sqlite3.connect(airflow_home / "airflow.db") as db:  # the mapped trigger tasks are labelled by capture
        labels = db.execute("SELECT rendered_map_index FROM task_instance WHERE dag_id = 'headavatar_ingest' "
                            "AND task_id = 'trigger_capture_runs'").fetchall()
    assert sorted(x for (x,) in labels) == ["018", "020"]
    assert store.exists(f"{raw}/sequence_EXP-1-head_part-1/020/EXP-1-head/cam_222200036.mp4")  # unpacked
