"""The Docker engine and stage images for the ``docker`` tests: the project's own engine (started
when none answers, stopped by PID at the end of the session only if the session started it) and
``make images``' builder (cached by Docker's layer cache: seconds when nothing changed)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_built: dict[str, str] = {}  # each test module registers the fixture; the build runs once per session


@pytest.fixture(scope="session")
def docker_env() -> Iterator[dict[str, str]]:
    """Environment (DOCKER_HOST, ...) of an engine holding current ``headavatar/preprocess`` and ``headavatar/cpu``."""
    from headavatar.devserver.docker_engine import DockerEngine
    from headavatar.devserver.images import build_images

    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.fail("no Docker engine installed: run `make docker-engine`, or deselect with -m 'not docker'")
    with DockerEngine(REPO / ".headavatar" / "docker") as engine:
        if not _built:
            build_images(env=engine.env())
            _built.update(engine.env())
        yield engine.env()
