"""images/ and infra/ checked with the real tools (hadolint, docker-compose, helm) and against the code.

What is checked without an engine: the Dockerfiles lint clean, run as non-root and bake in no
secret, their entrypoint accepts every command the DAG sends, the CPU image's packages are enough
for the stages it runs, and the compose stack / Helm chart validate and agree with the settings the
operators read. The built images are checked in tests/test_images.py (marker ``docker``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from headavatar.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from headavatar_airflow.execution import ExecutionSettings  # noqa: E402
from headavatar_airflow.pipeline import PARAM_DEFAULTS, STAGES, cli_args  # noqa: E402

IMAGES = REPO / "images"
COMPOSE = REPO / "infra" / "compose" / "docker-compose.yml"
CHART = REPO / "infra" / "k8s" / "headavatar"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:/usr/bin:/usr/local/bin")
    assert path, f"{name} not installed: run `make tools` (or `make test`, which does)"
    return path


def final_stage(dockerfile: Path) -> list[str]:
    """Instructions of the last build stage (the image that ships), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def test_dockerfiles_pass_hadolint() -> None:
    files = sorted([*IMAGES.glob("*.Dockerfile"), *IMAGES.glob("compose/*.Dockerfile")])
    assert {f.name for f in files} >= {"preprocess.Dockerfile", "cuda.Dockerfile", "airflow.Dockerfile",
                                       "seaweedfs.Dockerfile", "postgres.Dockerfile", "docker-proxy.Dockerfile"}
    r = subprocess.run([tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), *map(str, files)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["preprocess", "cuda"])
def test_stage_images_run_the_cli_as_non_root_without_secrets(name: str) -> None:
    dockerfile = IMAGES / f"{name}.Dockerfile"
    final = final_stage(dockerfile)
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(next(ln for ln in final if ln.upper().startswith("ENTRYPOINT "))[len("ENTRYPOINT "):]) == [
        "headavatar"]
    assert sum(ln.upper().startswith("FROM ") for ln in dockerfile.read_text().splitlines()) >= 2  # multi-stage
    for ln in dockerfile.read_text().splitlines():
        if ln.split(" ", 1)[0] in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY|TOKEN)", ln, re.I), ln
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["headavatar"] == \
        "headavatar.cli:main"


def test_every_stage_command_is_accepted_by_its_image() -> None:
    """The DAG sends `cli_args(...)` as the container command; the entrypoint prepends `headavatar`."""
    params = {**PARAM_DEFAULTS, "id": "018", "profile": "demo", "gpu": 0, "force": True}
    for stage in STAGES:
        image = "cuda" if stage.gpu else "preprocess"
        entry = json.loads(next(ln for ln in final_stage(IMAGES / f"{image}.Dockerfile")
                                if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
        argv = [*entry, *cli_args(stage.name, params)]
        args = build_parser().parse_args(argv[1:])
        assert (args.command, args.stage, args.capture) == ("run", stage.name, "018")
        r = subprocess.run([str(BIN / "headavatar"), *argv[1:2], "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--capture" in r.stdout


def test_cpu_image_packages_suffice_for_its_stages() -> None:
    """The CPU image has no PyTorch: stages 1-2 and ingestion must load without it."""
    locked = (IMAGES / "requirements" / "preprocess.txt").read_text()
    names = {ln.split("==")[0].lower() for ln in locked.splitlines() if "==" in ln}
    assert "torch" not in names and {"av", "opencv-python-headless", "boto3", "mlflow-skinny"} <= names
    code = ("import sys; sys.modules['torch'] = None\n"
            "from headavatar.stages import build_stage\n"
            "import headavatar.ingest, headavatar.tracking\n"
            "print([build_stage(s).name for s in ('extract', 'sample')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "['extract', 'sample']", r.stderr[-2000:]
    gpu_free = [s.name for s in STAGES if not s.gpu]
    assert gpu_free == ["extract", "sample"]


def test_compose_stack_validates_and_takes_secrets_only_from_env(tmp_path: Path) -> None:
    compose = tool("docker-compose")
    example = COMPOSE.parent / ".env.example"
    r = subprocess.run([compose, "-f", str(COMPOSE), "--env-file", str(example), "config"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stack = yaml.safe_load(r.stdout)["services"]
    assert {"postgres", "s3", "s3-init", "mlflow", "mlflow-init", "docker-proxy", "airflow-init", "airflow-apiserver",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"} <= set(stack)
    # One stack, tested as shipped: every service runs an image built from this repository's Dockerfiles by the
    # file's own build: sections (make images-compose and the compose test build exactly these), and no one-shot
    # step can hide its failure.
    built = {svc["image"]: svc["build"] for svc in stack.values() if "build" in svc}
    for name, svc in stack.items():
        assert svc["image"] in built, (name, svc["image"], "is not built from a Dockerfile of this repository")
    for build in built.values():
        assert (REPO / build["dockerfile"]).is_file() or Path(build["context"], build["dockerfile"]).is_file(), build
    for name in ("s3-init", "mlflow-init", "airflow-init"):
        assert "|| true" not in json.dumps(stack[name]), name
    for script in COMPOSE.parent.glob("*"):
        assert "|| true" not in script.read_text(), script
    done = {"condition": "service_completed_successfully"}
    assert stack["mlflow"]["depends_on"]["s3-init"] == done
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert stack[name]["depends_on"]["mlflow-init"] == stack[name]["depends_on"]["airflow-init"] == done, name
    # Only the socket proxy sees the Docker socket, read-only; the scheduler talks to the proxy.
    for name, svc in stack.items():
        sock = [v for v in svc.get("volumes", []) if "docker.sock" in str(v)]
        assert not sock or (name == "docker-proxy" and all(str(v).endswith(":ro") or (
            isinstance(v, dict) and v.get("read_only")) for v in sock)), (name, sock)
    sched = stack["airflow-scheduler"]["environment"]
    assert sched["HEADAVATAR_EXECUTION"] == "docker" and sched["HEADAVATAR_DOCKER_URL"] == "tcp://docker-proxy:2375"
    assert stack["docker-proxy"]["environment"]["EXEC"] in (0, "0")
    assert "--backend-store-uri=postgresql+psycopg2://" in " ".join(stack["mlflow"]["command"])  # SQLAlchemy 2.1's
    # bare postgresql:// means psycopg 3, which the MLflow image does not have
    # Every secret is a required variable: with an empty .env the stack refuses to start.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    r = subprocess.run([compose, "-f", str(COMPOSE), "--env-file", str(empty), "config", "-q"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "in .env" in r.stderr
    # ... and the file itself holds none: every secret-named setting is a ${VARIABLE} reference.
    raw = yaml.safe_load(COMPOSE.read_text())
    envs = [raw["x-airflow"]["environment"], *(svc.get("environment", {}) for svc in raw["services"].values())]
    checked = 0
    for env in envs:
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|FERNET|ACCESS_KEY", key):
                assert str(value).startswith("${"), (key, value)
                checked += 1
        for conn in [k for k in env if k.startswith("AIRFLOW_CONN_")]:
            if "password" in env[conn]:
                assert re.search(r'"password": "\$\{[A-Z0-9_]+:\?', env[conn]), conn
    assert checked >= 8


def test_a_worker_host_gets_only_what_workers_need_and_runs_what_the_central_host_runs(tmp_path: Path) -> None:
    """docker-compose.worker.yml (an added GPU host) from the env file new-env.py --worker-of writes: it validates,
    holds no admin credential, and its workers run the central `celery` profile's workers with the same
    settings, only with the central host's addresses in place of service names."""
    compose = tool("docker-compose")
    central_env = tmp_path / "central.env"
    worker_env = tmp_path / "worker.env"
    new_env = [sys.executable, str(COMPOSE.parent / "new-env.py")]
    subprocess.run([*new_env, "--out", str(central_env), "COMPOSE_PROFILES=celery", "AIRFLOW_EXECUTOR=CeleryExecutor",
                    "HEADAVATAR_CENTRAL=10.0.0.5", "DOCKER_GID=999", 'HEADAVATAR_INGEST_PARAMS={"profile": "demo"}'],
                   check=True, capture_output=True)
    r = subprocess.run([*new_env, "--worker-of", str(central_env), "--out", str(worker_env), "DOCKER_GID=999"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "HEADAVATAR_HOST" in r.stderr  # a host must be named
    subprocess.run([*new_env, "--worker-of", str(central_env), "--out", str(worker_env), "HEADAVATAR_HOST=gpu2",
                    "DOCKER_GID=999"], check=True, capture_output=True)
    assert worker_env.stat().st_mode & 0o777 == 0o600
    central_values = dict(line.split("=", 1) for line in central_env.read_text().splitlines()
                          if "=" in line and not line.startswith("#"))
    values = dict(line.split("=", 1) for line in worker_env.read_text().splitlines())
    for key in ("S3_ADMIN_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "MLFLOW_DB_PASSWORD",
                "S3_MLFLOW_SECRET_KEY", "S3_READONLY_SECRET_KEY", "AIRFLOW_API_SECRET_KEY", "FLOWER_PASSWORD"):
        assert key not in values and central_values[key] not in worker_env.read_text(), key
    assert values["REDIS_PASSWORD"] == central_values["REDIS_PASSWORD"] != "change-me"

    def services(file: Path, env: Path) -> dict:
        r = subprocess.run([compose, "-f", str(file), "--env-file", str(env), "config"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return yaml.safe_load(r.stdout)["services"]

    central, worker = services(COMPOSE, central_env), services(COMPOSE.parent / "docker-compose.worker.yml", worker_env)
    assert set(worker) == {"docker-proxy", "airflow-worker-cpu", "airflow-worker-gpu"}
    assert {"redis", "airflow-worker-cpu", "airflow-worker-gpu", "airflow-flower"} <= set(central)
    for name in ("airflow-worker-cpu", "airflow-worker-gpu"):
        assert worker[name]["command"] == [a.replace("main", "gpu2") for a in central[name]["command"]], name
        w, c = worker[name]["environment"], central[name]["environment"]
        assert c["AIRFLOW__CORE__EXECUTOR"] == w["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        # The same settings (ingestion's run parameters too: any host's cpu worker may run it), save the central
        # services' own (the api-server's session secret, the scheduler's verdict on lost workers, the
        # dag-processor's pausing and ingestion schedule) and the addresses.
        assert w["HEADAVATAR_INGEST_PARAMS"] == c["HEADAVATAR_INGEST_PARAMS"] == '{"profile": "demo"}'
        central_only = {"AIRFLOW__API__SECRET_KEY", "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT",
                        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "HEADAVATAR_INGEST_SCHEDULE"}
        assert set(w) == set(c) - central_only, set(w) ^ set(c)
        for key, value in w.items():
            if key == "HEADAVATAR_HOST":
                assert (value, c[key]) == ("gpu2", "main")
            elif key == "HEADAVATAR_DOCKER_NETWORK":
                assert value == c[key] == "headavatar"
            elif value != c[key]:
                assert "10.0.0.5" in value, (key, value, c[key])
    gpu_worker = central["airflow-worker-gpu"]["command"]
    assert gpu_worker[gpu_worker.index("--queues") + 1] == "gpu,gpu.main"
    # The broker has a password or does not start; Flower likewise.
    assert "REDIS_PASSWORD:?" in (REPO / "images" / "compose" / "redis-entrypoint.sh").read_text()
    assert "set FLOWER_PASSWORD" in " ".join(central["airflow-flower"]["command"])


def test_helm_chart_lints_and_matches_what_the_operators_expect() -> None:
    helm = tool("helm")
    r = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([helm, "template", "headavatar", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(r.stdout) if d}
    defaults = ExecutionSettings(backend="kubernetes")
    assert ("Namespace", defaults.k8s_namespace) in docs
    settings = docs[("ConfigMap", defaults.k8s_settings)]
    assert settings["metadata"]["namespace"] == defaults.k8s_namespace
    assert set(settings["data"]) >= {"HEADAVATAR_S3_ENDPOINT", "HEADAVATAR_S3_BUCKET", "MLFLOW_TRACKING_URI"}
    assert not any(k.startswith("AWS_SECRET") for k in settings["data"])
    mlflow = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    assert mlflow["securityContext"]["runAsNonRoot"] is True
    assert mlflow["containers"][0]["envFrom"][0]["secretRef"]["name"] == "headavatar-s3"

    values = yaml.safe_load((REPO / "infra" / "k8s" / "airflow-values.yaml").read_text())
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    env = {e["name"]: e["value"] for e in values["env"]}
    assert values["executor"] == "KubernetesExecutor" and env["HEADAVATAR_EXECUTION"] == "kubernetes"
    assert env["HEADAVATAR_K8S_NAMESPACE"] == chart_values["stageNamespace"] == defaults.k8s_namespace
    assert env["HEADAVATAR_K8S_S3_SECRET"] == chart_values["s3"]["credentialsSecret"] == defaults.k8s_s3_secret
    assert values["workers"]["serviceAccount"]["name"] == chart_values["airflow"]["serviceAccount"]
    binding = docs[("RoleBinding", "headavatar-stage-pods")]
    assert binding["subjects"][0]["name"] == chart_values["airflow"]["serviceAccount"]


def test_failure_advice_names_what_the_images_contain() -> None:
    """docs/failures.md and the detectors' own errors may advise a landmark detector only where the CUDA image
    has it by default, or together with the build argument that adds it."""
    defaults = dict(re.findall(r"^ARG (WITH_\w+)=(\d)$", (IMAGES / "cuda.Dockerfile").read_text(), re.M))
    build_arg = {"dlib": "WITH_DLIB", "face_alignment": "WITH_FAN"}
    advice = (REPO / "docs" / "failures.md").read_text().split("\n* ")
    for module in ("fan", "dlib68"):
        advice += (REPO / "tasks" / "headavatar" / "landmarks" / f"{module}.py").read_text().split("raise ")
    advised = 0
    for text in advice:
        for detector in re.findall(r"(?:set|use)\s+`?landmarks\.detector=(\w+)", text):
            if detector == "ground_truth":  # no model: every image can
                continue
            assert defaults[build_arg[detector]] == "1" or f"{build_arg[detector]}=1" in text, text
            advised += 1
    assert advised >= 3
