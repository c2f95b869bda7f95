"""The stage images as built by `make images`: non-root, commit recorded, no secrets, scratch volume,
the right packages, and torch's threads following a container's CPU limit."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from docker_fixtures import docker_env  # noqa: F401 (the session fixture)
from headavatar.devserver.images import TORCH_VERSION, cpu_image, git_commit, preprocess_image

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _docker(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("image", [preprocess_image(), cpu_image()])
def test_image_is_non_root_records_the_commit_and_holds_no_secret(docker_env: dict[str, str],  # noqa: F811
                                                                  image: str) -> None:
    r = _docker(docker_env, "image", "inspect", image)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["headavatar"]
    assert config["Labels"]["org.opencontainers.image.revision"] == git_commit()
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HEADAVATAR_GIT_COMMIT"] == git_commit()
    assert env["HEADAVATAR_SCRATCH"] == "/scratch" and "/scratch" in config["Volumes"]
    assert not [k for k in env if re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN|PIP_CERT", k)]
    history = _docker(docker_env, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "AWS_SECRET" not in history
    # The build's extra CAs (a TLS-inspecting proxy's) stay in the dependency stage.
    ls = _docker(docker_env, "run", "--rm", "--entrypoint", "sh", image, "-c",
                 "ls /usr/local/share/ca-certificates; id -u; touch /scratch/x && echo scratch-writable")
    assert ls.returncode == 0, ls.stderr
    assert ".crt" not in ls.stdout and "10001" in ls.stdout and "scratch-writable" in ls.stdout


def test_stage_images_hold_what_their_stages_import(docker_env: dict[str, str]) -> None:  # noqa: F811
    stages = _docker(docker_env, "run", "--rm", cpu_image(), "stages")
    assert stages.returncode == 0 and stages.stdout.split() == [
        "extract", "sample", "matting", "fitting", "meshhead", "gaussianhead"], stages.stderr
    no_torch = _docker(docker_env, "run", "--rm", "--entrypoint", "python", preprocess_image(), "-c",
                       "import importlib.util as u; import headavatar.stages.extract, headavatar.ingest; "
                       "print(u.find_spec('torch') is None)")
    assert no_torch.returncode == 0 and no_torch.stdout.strip() == "True", no_torch.stderr
    cpu = _docker(docker_env, "run", "--rm", "--entrypoint", "python", cpu_image(), "-c",
                  "import torch, torchmetrics, headavatar.stages.gaussianhead; "
                  "print(torch.__version__, torch.cuda.is_available())")
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    assert cpu.stdout.split() == [f"{TORCH_VERSION}+cpu", "False"]  # images/requirements/torch.txt


def test_torch_threads_follow_the_container_cpu_limit(docker_env: dict[str, str]) -> None:  # noqa: F811
    code = ("import torch; from headavatar.devices import resolve_device, cgroup_cpu_quota; "
            "before = torch.get_num_threads(); resolve_device('auto'); "
            "print(before, torch.get_num_threads(), cgroup_cpu_quota())")
    r = _docker(docker_env, "run", "--rm", "--cpus", "1", "--entrypoint", "python", cpu_image(), "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    _before, after, quota = r.stdout.split()
    assert (after, quota) == ("1", "1.0")
    unlimited = _docker(docker_env, "run", "--rm", "--entrypoint", "python", cpu_image(), "-c", code)
    assert unlimited.stdout.split()[2] == "None"
