"""``make images-compose``: the compose stack's images, built from the ``build:`` sections of
infra/compose/docker-compose.yml itself, so the images the tests start are the ones users build.

Each service with a ``build:`` section is built once per image tag, with its Dockerfile and the file's
build arguments (those the Dockerfile declares), except ``PYTHON_IMAGE``: ``HEADAVATAR_PYTHON_IMAGE``
where set (as ``docker compose build`` reads it), else the public Python image where a registry answers,
else the project's own Debian image (``images/base/build.sh``), as ``make images`` chooses. Extra CA certificates
this host trusts go to pip for the install commands only (``EXTRA_CA_CERT``, TLS-inspecting proxies).
Docker's layer cache makes a second build take seconds. Held under the same lock as the stage images.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from headavatar.devserver.images import LOCAL_CAS, REPO, build_lock, git_commit, python_base

COMPOSE_FILE = REPO / "infra" / "compose" / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


@dataclass(frozen=True)
class ImageBuild:
    image: str
    dockerfile: Path
    context: Path
    args: dict[str, str]


def interpolate(value: str, environ: dict[str, str]) -> str:
    """``${VAR:-default}`` as compose reads it (the variable where set, else the default)."""
    return _VARIABLE.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def compose_builds(path: Path = COMPOSE_FILE, environ: dict[str, str] | None = None) -> list[ImageBuild]:
    """One build per image tag named by a service with a ``build:`` section, in file order."""
    environ = dict(os.environ if environ is None else environ)
    builds: dict[str, ImageBuild] = {}
    for name, service in yaml.safe_load(path.read_text())["services"].items():
        if "build" not in service:
            continue
        build = service["build"]
        context = (path.parent / interpolate(build["context"], environ)).resolve()
        image = interpolate(service["image"], environ)
        args = {k: interpolate(str(v), environ) for k, v in (build.get("args") or {}).items()}
        if image in builds and builds[image].dockerfile != context / build["dockerfile"]:
            raise ValueError(f"{path}: image {image} is built from two Dockerfiles (service {name})")
        builds[image] = ImageBuild(image, context / build["dockerfile"], context, args)
    return list(builds.values())


def _extra_ca() -> str:
    pem = os.environ.get("BUILD_CA_CERT_FILE")
    certs = [Path(pem)] if pem else sorted(LOCAL_CAS.glob("*.crt"))
    return "".join(c.read_text() for c in certs)


def build_compose_images(base: str = "auto", env: dict[str, str] | None = None) -> dict[str, float]:
    """Build every image of the compose file; seconds per image."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0", **(env or {})}
    times: dict[str, float] = {}
    with build_lock():
        python_image = env.get("HEADAVATAR_PYTHON_IMAGE") or python_base(base, env)
        extra = {"PYTHON_IMAGE": python_image, "EXTRA_CA_CERT": _extra_ca(), "GIT_COMMIT": git_commit()}
        for b in compose_builds(environ=env):
            declared = set(re.findall(r"^ARG (\w+)", b.dockerfile.read_text(), re.M))
            args = {k: v for k, v in {**b.args, **extra}.items() if k in declared}
            t = time.monotonic()
            r = subprocess.run(["docker", "build", "-q", "-f", str(b.dockerfile),
                                *(a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")),
                                "-t", b.image, str(b.context)], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"building {b.image} from {b.dockerfile.relative_to(REPO)} failed:\n"
                                   f"{r.stderr[-3000:]}")
            times[b.image] = time.monotonic() - t
            print(f"built {b.image} in {times[b.image]:.0f} s", file=sys.stderr, flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default=os.environ.get("BASE", "auto"), choices=["auto", "public", "local"])
    args = parser.parse_args(argv)
    try:
        times = build_compose_images(args.base)
    except (subprocess.CalledProcessError, RuntimeError, ValueError) as e:
        print(f"make images-compose: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in times.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
