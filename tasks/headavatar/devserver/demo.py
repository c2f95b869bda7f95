"""``make demo``: the per-capture DAG end to end on the embedded defaults, on a CPU-only machine.

Starts the embedded services on 127.0.0.1 (SeaweedFS S3 and a real ``mlflow server``, data under
``.headavatar/demo``), writes a small synthetic capture for id 018, and runs the Airflow DAG
``headavatar_capture`` for it with ``airflow dags test`` and the ``local`` backend: every task
runs the same ``headavatar run`` command a container would, with the ``demo`` config profile.
``make demo-ui`` serves the same data again for a look at the MLflow runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from headavatar.contract.outputs import RESERVED_PREFIX
from headavatar.contract.stage import read_manifest
from headavatar.devserver.mlflow_server import EmbeddedMLflow
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

log = logging.getLogger("headavatar.demo")
BUCKET = "headavatar"
REPO = Path(__file__).resolve().parents[3]  # a source checkout: dags/ and plugins/ live beside tasks/


def airflow_env(home: Path, s3: dict[str, str], mlflow_uri: str) -> dict[str, str]:
    """A self-contained Airflow (SQLite under ``home``) whose connections point at the embedded services."""
    return {
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "tasks")]),
        "HEADAVATAR_EXECUTION": "local",
        "AIRFLOW_CONN_HEADAVATAR_S3": json.dumps({
            "conn_type": "aws", "login": s3["AWS_ACCESS_KEY_ID"], "password": s3["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3["HEADAVATAR_S3_ENDPOINT"], "bucket": BUCKET, "region_name": "us-east-1"}}),
        "AIRFLOW_CONN_HEADAVATAR_MLFLOW": json.dumps({"conn_type": "http", "extra": {"tracking_uri": mlflow_uri}}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capture", default="018")
    parser.add_argument("--home", type=Path, default=Path(".headavatar/demo"))
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--serve", action="store_true", help="only serve the demo's S3 + MLflow until Ctrl-C")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))  # stop the servers on SIGTERM too

    home = args.home.resolve()
    s3 = EmbeddedS3(home / "s3").start()
    mlflow = None
    try:
        env = {**os.environ, **s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET}
        mlflow = EmbeddedMLflow(home / "mlflow", s3.env(), BUCKET)
        mlflow.start()
        if args.serve:
            return _serve(mlflow.uri, s3.endpoint_url)
        return _run(args, home, env, mlflow.uri)
    finally:
        if mlflow is not None:
            mlflow.stop()
        s3.stop()


def _run(args: argparse.Namespace, home: Path, env: dict[str, str], mlflow_uri: str) -> int:
    cli = [sys.executable, "-m", "headavatar.cli"]  # synth creates the bucket if needed
    t0 = time.monotonic()
    subprocess.run([*cli, "synth", "--capture", args.capture, "--width", "256", "--height", "372",
                    "--frames", str(args.frames), "--sequence", "EXP-1-head", "--sequence", "EXP-2-eyes"],
                   env=env, check=True)
    af = {**env, **airflow_env(home / "airflow", env, mlflow_uri)}
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=af, check=True, stdout=subprocess.DEVNULL)
    conf = json.dumps({"id": args.capture, "profile": "demo"})
    log.info("running DAG headavatar_capture with conf %s (local backend)", conf)
    dag = subprocess.run([*airflow, "dags", "test", "headavatar_capture", "--conf", conf], env=af)

    os.environ.update(env)
    store = ObjectStore(load_config().storage)
    try:
        done = {s: read_manifest(store, args.capture, s) is not None for s in STAGE_NAMES}
        if dag.returncode != 0 or not all(done.values()):
            log.error("the DAG run failed (exit %d); stages done: %s; task logs under %s", dag.returncode,
                      [s for s, ok in done.items() if ok], home / "airflow" / "logs")
            return dag.returncode or 1
        out = export(store, args.capture, STAGE_NAMES[-1], home / "output" / args.capture)
    finally:
        store.close()
    print(json.dumps({
        "capture": args.capture, "stages": list(STAGE_NAMES), "seconds": round(time.monotonic() - t0, 1),
        "outputs": f"s3://{BUCKET}/{load_config().storage.prefix}/avatars/{args.capture}/",
        "local_copy_of_last_stage": str(out),
        "mlflow": _parent_run(mlflow_uri, args.capture),
        "browse": "make demo-ui  (serves this S3 data and the MLflow UI again until Ctrl-C)",
    }, indent=1))
    return 0


def _parent_run(uri: str, capture: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    from headavatar.tracking import experiment_name, model_name

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name())
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'pipeline' and tags.`headavatar.capture` = '{capture}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    versions = client.search_model_versions(f"name = '{model_name(capture)}'")
    return {"run": runs[0].info.run_name, "run_id": runs[0].info.run_id, "experiment_id": exp.experiment_id,
            "registered_model": model_name(capture), "versions": str(len(versions))}


def _serve(mlflow_uri: str, s3_url: str) -> int:
    print(json.dumps({"mlflow_ui": mlflow_uri, "s3_endpoint": s3_url, "stop": "Ctrl-C"}, indent=1), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def export(store: ObjectStore, capture: str, stage: str, dest: Path) -> Path:
    """Copy a stage's outputs to a local folder so a person can look at them."""
    prefix = store.key(stage_prefix(capture, stage))
    rels = ((o.key, o.key[len(prefix) + 1:]) for o in store.list(prefix))
    store.download_many((key, dest / rel) for key, rel in rels if not rel.startswith(RESERVED_PREFIX))
    return dest


if __name__ == "__main__":
    sys.exit(main())
