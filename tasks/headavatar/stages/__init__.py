"""The six stages, in pipeline order. Each is one ``headavatar run <stage>`` subcommand.

Stages are imported one at a time, by name: the CPU image (stages 1-2, ingestion) carries no
PyTorch, and a command that only names stages loads neither OpenCV nor PyAV.
"""

from __future__ import annotations

from importlib import import_module

from headavatar.contract.stage import Stage

_CLASSES = {
    "extract": "headavatar.stages.extract:Extract",
    "sample": "headavatar.stages.sample:Sample",
    "matting": "headavatar.stages.matting:Matting",
    "fitting": "headavatar.stages.fitting:Fitting",
    "meshhead": "headavatar.stages.meshhead:MeshHeadStage",
    "gaussianhead": "headavatar.stages.gaussianhead:GaussianHeadStage",
}
STAGE_NAMES = tuple(_CLASSES)


def build_stage(name: str) -> Stage:
    module, cls = _CLASSES[name].split(":")
    return getattr(import_module(module), cls)()


def build_stages() -> dict[str, Stage]:
    return {name: build_stage(name) for name in STAGE_NAMES}
