"""One place for each pin: the torch versions are written once, in images/requirements/torch.txt (the CPU
side: this test environment, the CPU stage image, CI) and torch-cuda.txt (the CUDA image and the GPU
benchmarks; that file says why it differs), and everything that installs or reports torch agrees with them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

from headavatar.devserver.images import TORCH_VERSION, cuda_build_args, torch_pin

REPO = Path(__file__).resolve().parents[1]


def make_variable(name: str) -> str:
    """A variable's value as the Makefile computes it."""
    r = subprocess.run(["make", "-s", "--no-print-directory", f"--eval=print-pin: ; @echo $({name})", "print-pin"],
                       cwd=REPO, capture_output=True, text=True, check=True)
    return r.stdout.strip()


def test_the_cpu_side_runs_the_pinned_torch() -> None:
    pin = torch_pin("torch.txt")
    assert torch.__version__.split("+")[0] == pin, f"this environment has torch {torch.__version__}, the pin is {pin}"
    assert pin == TORCH_VERSION  # the CPU stage image's build argument
    assert make_variable("TORCH_VERSION") == pin  # make install


def test_the_cuda_image_and_the_gpu_benchmarks_use_the_cuda_pin() -> None:
    pin = torch_pin("torch-cuda.txt")
    dockerfile = (REPO / "images" / "cuda.Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == pin
    assert cuda_build_args("headavatar/base:bookworm")["TORCH_VERSION"] == pin  # make images-cuda passes it
    measured = {}
    for result in sorted((REPO / "benchmarks" / "results").glob("*gpu*.json")):
        for version in re.findall(r'"torch": "([^"]+)"', result.read_text()):
            measured[result.name] = version
    assert measured, "no GPU benchmark result records its torch version"
    wrong = {name: v for name, v in measured.items() if v.split("+")[0] != pin}
    assert not wrong, f"GPU results measured on another torch than {pin}: {wrong}"


def test_nothing_else_pins_torch() -> None:
    """No Dockerfile, Makefile line or script writes a torch version of its own; the one Dockerfile default
    that must be a literal (an ARG cannot read a file) is checked above."""
    files = [REPO / "Makefile", *REPO.glob("images/**/*.Dockerfile"), *REPO.glob("benchmarks/*.sh"),
             *REPO.glob("tasks/headavatar/devserver/*.py"), REPO / ".ci" / "run", REPO / "pyproject.toml",
             *REPO.glob("tests/*.py"), *REPO.glob("docs/containers.md")]
    pinned = re.compile(r"(torch==|torch-|TORCH_VERSION\s*\??:?=\s*|\")\d+\.\d+\.\d+\+cpu|"
                        r"(torch==|TORCH_VERSION\s*\??:?=\s*)\"?\d+\.\d+")
    found = [f"{path.relative_to(REPO)}: {line.strip()}" for path in files for line in path.read_text().splitlines()
             if pinned.search(line) and not line.lstrip().startswith("#")]
    assert found == [f"images/cuda.Dockerfile: ARG TORCH_VERSION={torch_pin('torch-cuda.txt')}"], found
