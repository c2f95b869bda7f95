"""The six stages, in pipeline order. Each is one ``headavatar run <stage>`` subcommand."""

from __future__ import annotations

from headavatar.contract.stage import Stage, StageContext
from headavatar.errors import StageNotImplemented


class _Pending(Stage):
    """A declared stage whose implementation has not landed: it fails loudly, never silently."""

    config_sections = ()

    def __init__(self, name: str, inputs: tuple[str, ...], issue: int):
        self.name, self.inputs, self.issue = name, inputs, issue  # type: ignore[misc]

    def check_available(self) -> None:
        raise StageNotImplemented(f"stage {self.name!r} is not implemented yet (tracked in issue {self.issue})")

    def run(self, ctx: StageContext) -> None:
        self.check_available()


def build_stages() -> dict[str, Stage]:
    # Imported here so that commands which only name stages do not load OpenCV/PyAV.
    from headavatar.stages.extract import Extract
    from headavatar.stages.fitting import Fitting
    from headavatar.stages.matting import Matting
    from headavatar.stages.meshhead import MeshHeadStage
    from headavatar.stages.sample import Sample

    stages: list[Stage] = [
        Extract(),
        Sample(),
        Matting(),
        Fitting(),
        MeshHeadStage(),
        _Pending("gaussianhead", ("sample", "matting", "fitting", "meshhead"), 9),
    ]
    return {s.name: s for s in stages}


STAGE_NAMES = ("extract", "sample", "matting", "fitting", "meshhead", "gaussianhead")
