"""What each stage task may use: its attempt time limit and, on Kubernetes, its pod's requests.

Read from the pipeline config's ``orchestration`` section (``config/pipeline.yaml``, the profile in
``$HEADAVATAR_PROFILE``) when the DAG file is parsed, so operators tune them where every other
setting lives, with the same validation and reference docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from headavatar.settings import OrchestrationConfig, load_config


@dataclass(frozen=True)
class StageLimits:
    timeout: timedelta
    cpu: str
    memory: str
    ephemeral_storage: str


def orchestration() -> OrchestrationConfig:
    return load_config().orchestration


def dagrun_timeout(cfg: OrchestrationConfig | None = None) -> timedelta:
    return timedelta(hours=(cfg or orchestration()).dagrun_timeout_h)


def stage_limits(stage: str, cfg: OrchestrationConfig | None = None) -> StageLimits | None:
    """A pipeline stage's limits; None for other commands run as tasks (ingestion's ``unpack``)."""
    cfg = cfg or orchestration()
    if not hasattr(cfg, f"{stage}_timeout_h"):
        return None
    return StageLimits(timeout=timedelta(hours=getattr(cfg, f"{stage}_timeout_h")), cpu=getattr(cfg, f"{stage}_cpu"),
                       memory=getattr(cfg, f"{stage}_memory"),
                       ephemeral_storage=getattr(cfg, f"{stage}_ephemeral_storage"))
