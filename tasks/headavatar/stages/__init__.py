"""The six stages, in pipeline order. Each is one ``headavatar run <stage>`` subcommand."""

from __future__ import annotations

from headavatar.contract.stage import Stage


def build_stages() -> dict[str, Stage]:
    # Imported here so that commands which only name stages do not load OpenCV/PyAV.
    from headavatar.stages.extract import Extract
    from headavatar.stages.fitting import Fitting
    from headavatar.stages.gaussianhead import GaussianHeadStage
    from headavatar.stages.matting import Matting
    from headavatar.stages.meshhead import MeshHeadStage
    from headavatar.stages.sample import Sample

    stages: list[Stage] = [
        Extract(),
        Sample(),
        Matting(),
        Fitting(),
        MeshHeadStage(),
        GaussianHeadStage(),
    ]
    return {s.name: s for s in stages}


STAGE_NAMES = ("extract", "sample", "matting", "fitting", "meshhead", "gaussianhead")
