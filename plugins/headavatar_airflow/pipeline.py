"""What the DAGs declare: the stages in order, where each runs, and the run parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Same pattern as headavatar.capture_id (a test keeps them equal): checked by the trigger form and
# again by the stage CLI before the id touches a key.
CAPTURE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


@dataclass(frozen=True)
class StageSpec:
    name: str
    gpu: bool  # runs in the CUDA image, in the GPU pool
    gpus_param: str | None = None  # the run parameter saying how many GPUs it leases (unset: one)

    def gpus(self, params: dict[str, Any]) -> int:
        """How many GPUs this stage leases for a run with ``params``."""
        return int(params.get(self.gpus_param) or 1) if self.gpus_param else 1


STAGES = (
    StageSpec("extract", gpu=False),
    StageSpec("sample", gpu=False),
    StageSpec("matting", gpu=True),
    StageSpec("fitting", gpu=True),
    StageSpec("meshhead", gpu=True),
    StageSpec("gaussianhead", gpu=True, gpus_param="gaussianhead_gpus"),
)

# Trigger-form parameter -> pipeline setting (passed as --set); null means "the profile's value".
PARAM_SETTINGS = {
    "sample_stride": "sample.frame_stride",
    "meshhead_steps": "meshhead.steps",
    "gaussianhead_steps": "gaussianhead.steps",
    "gaussianhead_gpus": "gaussianhead.ranks",
}


def param_schema() -> dict[str, dict[str, Any]]:
    """JSON-schema of each run parameter (the UI's trigger form is generated from it)."""
    return {
        "id": {"type": "string", "pattern": CAPTURE_ID_PATTERN, "minLength": 1, "maxLength": 64,
               "title": "Capture id", "description": "NeRSemble capture id, e.g. 018 (raw/ must hold it)"},
        "profile": {"type": ["null", "string"], "pattern": r"^[A-Za-z0-9_-]+$", "title": "Config profile",
                    "description": "config/profiles/<name>.yaml overlay, e.g. demo; empty for the defaults"},
        "sample_stride": {"type": ["null", "integer"], "minimum": 1, "maximum": 1000,
                          "title": "Sample stride", "description": "keep every N-th extracted frame"},
        "meshhead_steps": {"type": ["null", "integer"], "minimum": 1, "maximum": 1_000_000,
                           "title": "Mesh-head training steps"},
        "gaussianhead_steps": {"type": ["null", "integer"], "minimum": 1, "maximum": 10_000_000,
                               "title": "Gaussian-head training steps"},
        "gaussianhead_gpus": {"type": ["null", "integer"], "minimum": 1, "maximum": 64,
                              "title": "Gaussian-head GPUs",
                              "description": "train stage 6 data-parallel on this many GPUs of one host, one "
                                             "lease each (empty = 1); the profile's gaussianhead.views_per_step "
                                             "must be a multiple of it (the default profile's is 1)"},
        "gpu": {"type": ["null", "integer"], "minimum": 0, "maximum": 63, "title": "GPU index",
                "description": "pin GPU stages to this device (docker/local); empty = any free GPU"},
        "force": {"type": "boolean", "title": "Recompute",
                  "description": "recompute every stage once in this run, ignoring cache hits and earlier "
                                 "checkpoints (its retries resume its own)"},
    }


# What a refused value should have been, in words (plain_refusals.py puts it in place of the schema dump).
PARAM_RULES = {
    "id": "use the capture's name as it is in the bucket, such as 018: letters, digits, '_' and '-', "
          "starting with a letter or digit, at most 64 characters",
    "profile": "use the name of a file in config/profiles/ without .yaml, such as demo, or leave it empty",
}


PARAM_DEFAULTS: dict[str, Any] = {"profile": None, "sample_stride": None, "meshhead_steps": None,  # id: required
                                  "gaussianhead_steps": None, "gaussianhead_gpus": None, "gpu": None, "force": False}


def cli_args(stage: str, params: dict[str, Any], run_id: str = "") -> list[str]:
    """The stage command for a run's parameters (values already validated by the Param schema). A forced run
    forces once per run (``--force-run <run id>``): its retries and cleared tasks resume their own checkpoints
    and take their own results instead of starting hours of training over."""
    args = ["run", stage, "--capture", str(params["id"])]
    if params.get("profile"):
        args += ["--profile", str(params["profile"])]
    for param, setting in PARAM_SETTINGS.items():
        if params.get(param) is not None:
            args += ["--set", f"{setting}={int(params[param])}"]
    if params.get("force"):
        args += ["--force-run", run_id] if run_id else ["--force"]
    return args
