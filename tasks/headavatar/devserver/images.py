"""``make images``: the stage images, built the same way here (no registry) and on a normal host.

Two images from the repository's Dockerfiles: ``headavatar/preprocess`` (stages 1-2, ingestion)
and ``headavatar/cpu`` (stages 3-6 on CPU, ``images/cuda.Dockerfile`` with CPU build arguments).
The base is a build argument: the public ``python:3.11.11-slim-bookworm`` where a registry answers,
else the project's own Debian image (``images/base/build.sh``, cached by its recipe hash). PyTorch
comes from the CPU index, or, where a CPU wheel is on disk (``TORCH_WHEEL``), from a wheel index
served on 127.0.0.1 for the build only (the build then uses the host network). Docker's layer cache
makes a second build, or a code-only change, take seconds; the demo and the tests call
:func:`build_images` too.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
PUBLIC_PYTHON = "python:3.11.11-slim-bookworm"


def torch_pin(lock: str = "torch.txt") -> str:
    """The torch version pinned in ``images/requirements/<lock>`` (the one place it is written)."""
    lines = (REPO / "images" / "requirements" / lock).read_text().splitlines()
    return next(ln.removeprefix("torch==").strip() for ln in lines if ln.startswith("torch=="))


TORCH_VERSION = torch_pin()
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
WHEEL_DIRS = (Path("/opt/wheels"),)
WHEEL_PORT = 38471  # fixed, so the build argument (and with it Docker's layer cache) is stable
IMAGE_TAG = "0.1.0"
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# Held while images build, by this module and headavatar.devserver.compose_images: a build started in
# the background (.ci/run) and a test fixture's build of the same images wait for each other instead of
# building the same layers twice at once.
BUILD_LOCK = REPO / ".headavatar" / "images.lock"


@contextlib.contextmanager
def build_lock(path: Path = BUILD_LOCK) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, however this process ends
        yield


def preprocess_image(tag: str = IMAGE_TAG) -> str:
    return f"headavatar/preprocess:{tag}"


def cpu_image(tag: str = IMAGE_TAG) -> str:
    return f"headavatar/cpu:{tag}"


def cuda_image(tag: str = IMAGE_TAG) -> str:
    return f"headavatar/cuda:{tag}"


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def _docker(*args: str, env: dict[str, str], check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(["docker", *args], env=env, check=check, stdout=out, stderr=out)


def python_base(base: str, env: dict[str, str]) -> str:
    """The Python base image: ``public``, ``local`` (built from Debian packages) or ``auto``."""
    if base not in ("auto", "public", "local"):
        raise ValueError(f"BASE must be auto, public or local, not {base!r}")
    if base == "public" or (base == "auto" and (
            _docker("image", "inspect", PUBLIC_PYTHON, env=env, check=False, quiet=True).returncode == 0
            or _docker("pull", "-q", PUBLIC_PYTHON, env=env, check=False, quiet=True).returncode == 0)):
        return PUBLIC_PYTHON
    r = subprocess.run([str(REPO / "images/base/build.sh")], env=env, check=True, capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1]


def torch_wheel() -> Path | None:
    """A CPU torch wheel on this machine (``TORCH_WHEEL``, else the known wheel folders), if any."""
    if os.environ.get("TORCH_WHEEL"):
        return Path(os.environ["TORCH_WHEEL"])
    for folder in WHEEL_DIRS:
        found = sorted(folder.glob(f"torch-{TORCH_VERSION}+cpu-cp311-cp311-*linux*x86_64.whl"))
        if found:
            return found[-1]
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def wheel_index(wheel: Path) -> Iterator[str]:
    """A PEP 503 index holding only this torch wheel, on 127.0.0.1 while the build runs."""
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "torch").mkdir()
        (Path(root) / "torch" / wheel.name).symlink_to(wheel.resolve())
        handler = functools.partial(_Quiet, directory=root)
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
        except OSError:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


def copy_local_cas(dest: Path = REPO / "images/ca") -> list[str]:
    """The host's locally added CA certificates into the build context (git-ignored), so pip in the
    images' dependency stages trusts a TLS-inspecting proxy the host trusts. None on a normal host."""
    names = []
    for cert in sorted(LOCAL_CAS.glob("*.crt")):
        target = dest / cert.name
        if not target.exists() or target.read_bytes() != cert.read_bytes():
            shutil.copyfile(cert, target)
        names.append(cert.name)
    return names


def build_images(tag: str = IMAGE_TAG, base: str = "auto", env: dict[str, str] | None = None,
                 context: Path = REPO) -> dict[str, float]:
    """Build (or refresh from cache) both stage images from ``context`` (the checkout); seconds per phase."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0", **(env or {})}
    if shutil.which("docker", path=env.get("PATH")) is None:
        raise RuntimeError("docker CLI not found: run `make docker-engine` first")
    with build_lock():
        return _build_images(tag, base, env, context)


def _build_images(tag: str, base: str, env: dict[str, str], context: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    copy_local_cas(context / "images" / "ca")
    t = time.monotonic()
    python_image = python_base(base, env)
    times["base"] = time.monotonic() - t
    commit = git_commit()
    common = ["build", "--build-arg", f"GIT_COMMIT={commit}"]

    def build_preprocess() -> None:
        t = time.monotonic()
        _docker(*common, "-f", str(context / "images/preprocess.Dockerfile"), "--build-arg",
                f"PYTHON_IMAGE={python_image}", "-t", preprocess_image(tag), str(context), env=env)
        times["preprocess"] = time.monotonic() - t

    # The two builds at once: much of a cold build waits on downloads, so together they take less
    # than one after the other (a warm build takes seconds either way).
    t_both = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        preprocess = pool.submit(build_preprocess)
        wheel = torch_wheel()
        with wheel_index(wheel) if wheel else contextlib.nullcontext(TORCH_CPU_INDEX) as index:
            t = time.monotonic()
            _docker(*common, "-f", str(context / "images/cuda.Dockerfile"), "--network", "host",
                    "--build-arg", f"BUILD_IMAGE={python_image}", "--build-arg", f"RUNTIME_IMAGE={python_image}",
                    "--build-arg", "PYTHON_VERSION=system", "--build-arg", "BUILD_PACKAGES=",
                    "--build-arg", "WITH_GSPLAT=0", "--build-arg", "WITH_FAN=0", "--build-arg", "FLAVOUR=cpu",
                    "--build-arg", f"TORCH_VERSION={TORCH_VERSION}", "--build-arg", f"TORCH_INDEX={index}",
                    "-t", cpu_image(tag), str(context), env=env)
            times["cpu"] = time.monotonic() - t
        preprocess.result()
    times["both"] = time.monotonic() - t_both
    return times


# NVIDIA's CUDA compiler wheels (nvcc, its C++ front end, NVVM, CCCL headers) of the CUDA release that
# PyPI's torch of images/requirements/torch-cuda.txt is built with (2.11.0: cu130, runtime 13.0.96).
CUDA_COMPILER = "nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85"
PYPI_INDEX = "https://pypi.org/simple"


def cuda_build_args(python_image: str, arch_list: str | None = None) -> dict[str, str]:
    """The build arguments of ``images/cuda.Dockerfile`` for the CUDA image on a Debian Python base."""
    args = {"BUILD_IMAGE": python_image, "RUNTIME_IMAGE": python_image, "PYTHON_VERSION": "system",
            "BUILD_PACKAGES": "build-essential python3-dev", "TORCH_VERSION": torch_pin("torch-cuda.txt"),
            "TORCH_INDEX": PYPI_INDEX, "CUDA_COMPILER": CUDA_COMPILER, "MAX_JOBS": str(os.cpu_count() or 2),
            "FLAVOUR": "cuda", "GIT_COMMIT": git_commit()}
    return {**args, "TORCH_CUDA_ARCH_LIST": arch_list} if arch_list else args


def build_cuda_image(tag: str = IMAGE_TAG, base: str = "auto", arch_list: str | None = None,
                     env: dict[str, str] | None = None, context: Path = REPO) -> dict[str, float]:
    """``headavatar/cuda`` from ``images/cuda.Dockerfile`` on the Python base of :func:`python_base`
    (no nvidia/cuda image, no registry): PyPI's CUDA build of the CUDA torch pin, gsplat's kernels
    compiled by :data:`CUDA_COMPILER`'s nvcc for ``arch_list`` (default: the Dockerfile's list)."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0", **(env or {})}
    times: dict[str, float] = {}
    with build_lock():
        copy_local_cas(context / "images" / "ca")
        t = time.monotonic()
        python_image = python_base(base, env)
        times["base"] = time.monotonic() - t
        args = cuda_build_args(python_image, arch_list)
        t = time.monotonic()
        _docker("build", "-f", str(context / "images/cuda.Dockerfile"), "--network", "host",
                *[a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")],
                "-t", cuda_image(tag), str(context), env=env)
        times["cuda"] = time.monotonic() - t
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tag", default=IMAGE_TAG)
    parser.add_argument("--base", default=os.environ.get("BASE", "auto"), choices=["auto", "public", "local"])
    parser.add_argument("--cuda", action="store_true", help="build headavatar/cuda instead (make images-cuda)")
    parser.add_argument("--arch-list", default=os.environ.get("TORCH_CUDA_ARCH_LIST"),
                        help="with --cuda: the GPU architectures gsplat is compiled for (default: the Dockerfile's)")
    parser.add_argument("--out", type=Path, help="also write the result, with the images' sizes, as a benchmark "
                                                 "result (commit, date, machine, command)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cuda:
            images, times = [cuda_image(args.tag)], build_cuda_image(args.tag, args.base, args.arch_list)
        else:
            images, times = [preprocess_image(args.tag), cpu_image(args.tag)], build_images(args.tag, args.base)
    except (subprocess.CalledProcessError, RuntimeError, ValueError) as e:
        print(f"make images: {e}", file=sys.stderr)
        return 2
    result = {"images": images, "seconds": {k: round(v, 1) for k, v in times.items()}}
    if args.out:
        from headavatar.bench.provenance import stamp

        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        sizes = {i: int(subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", i], env=env,
                                       capture_output=True, text=True, check=True).stdout) for i in images}
        args.out.write_text(json.dumps(stamp({**result, "size_bytes": sizes, "arch_list": args.arch_list if args.cuda
                                              else None}, "headavatar.devserver.images", argv), indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
