"""``headavatar render``: the videos of a capture's trained avatar, rebuilt from stage 6's outputs.

Kept apart from avatar_video.py (which stage 6 itself uses to write the videos) so that the
stage and the video writer do not import each other.
"""

from __future__ import annotations

from pathlib import Path

from headavatar.avatar_video import reenactment_video, turntable_video
from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore


def load_avatar(store: ObjectStore, capture: str, config: PipelineConfig) -> GaussianHeadTrainer:
    """A capture's trained avatar as stage 6 left it, ready to render: its own saved config, the stage-5
    mesh head it started from, and the views (training frames, held-out cameras and sequences) it was
    scored on, all from the stage outputs in the bucket."""
    import tempfile

    from headavatar.contract.stage import StageContext, read_manifest
    from headavatar.devices import resolve_device
    from headavatar.errors import PipelineError
    from headavatar.gaussianhead.perceptual import Perceptual
    from headavatar.render.gaussian_raster import build_gaussian_rasterizer
    from headavatar.settings import GaussianHeadConfig
    from headavatar.stages.gaussianhead import build_avatar
    from headavatar.training.checkpoints import load_stored

    manifests = {s: read_manifest(store, capture, s) for s in ("sample", "matting", "fitting", "meshhead",
                                                                 "gaussianhead")}
    missing = [s for s, m in manifests.items() if m is None]
    if missing:
        raise PipelineError(f"{capture}: no finished stage {', '.join(missing)}: run the pipeline to stage 6 first")
    with tempfile.TemporaryDirectory(prefix="headavatar-render-") as tmp:
        ctx = StageContext("gaussianhead", capture, config, store, Path(tmp), manifests, {},
                           None)  # type: ignore[arg-type]  # reads inputs only
        saved = load_stored(store, ctx.input_key("gaussianhead", "avatar/avatar.pt"),
                            f"not an avatar stage gaussianhead wrote: rerun 'headavatar run gaussianhead --capture "
                            f"{capture} --force'", required=("head", "sr", "config"))
        cfg = GaussianHeadConfig.model_validate(saved["config"])
        device = resolve_device(config.gaussianhead.device)
        coarse, fine, extra, head, sr = build_avatar(ctx, cfg)
    head.load_state_dict(saved["head"])
    sr.load_state_dict(saved["sr"])
    return GaussianHeadTrainer(head.eval(), sr.eval(), coarse, fine, cfg,
                               build_gaussian_rasterizer(cfg.rasterizer, device), Perceptual(None), device, extra)


def render_capture(store: ObjectStore, capture: str, config: PipelineConfig, out: Path) -> dict:
    """``headavatar render``: both videos of a capture's trained avatar (stage 6 outputs), written to ``out``."""
    from headavatar.errors import PipelineError

    trainer = load_avatar(store, capture, config)
    if not trainer.eval_sets:
        raise PipelineError(f"{capture}: the avatar has no held-out camera to render from")
    s = next((e for e in trainer.eval_sets if e.name == "self_reenactment"), trainer.eval_sets[0])
    cam, height = trainer.held_cams[0], min(1024, trainer.cfg.fine_size)
    return {"reenactment": reenactment_video(trainer, s, cam, out / "reenactment.mp4", height=height),
            "turntable": turntable_video(trainer, 0, cam, out / "turntable.mp4", height=height)}
