"""Stage 5: train the mesh head (Gaussian Head Avatar stage 1) from stages 2-4.

Outputs: ``model.pt`` (weights + what is needed to rebuild the model), ``neutral_mesh.npz``
(neutral surface in canonical 3DMM units: ``vertices``, ``faces``; stage 6 starts from it),
``history.json`` (losses and CPU/GPU usage every 10 steps, held-out IoU by step),
``renders/<NNNN>.jpg`` (GT | render | normals for every held-out camera) and
``checkpoints/step-<N>.pt`` every ``meshhead.keep_checkpoint_every`` steps. Training state is
checkpointed every ``meshhead.checkpoint_every`` steps; a retried task resumes from the last one.
"""

from __future__ import annotations

import io
import json
import logging

import cv2
import numpy as np
import torch

from headavatar.contract.stage import Stage, StageContext
from headavatar.devices import resolve_device
from headavatar.errors import PipelineError
from headavatar.imaging import encode_jpg, npy_array, npz_bytes
from headavatar.meshhead.trainer import MeshHeadTrainer, init_model, render
from headavatar.render.mesh_raster import build_mesh_rasterizer
from headavatar.training.checkpoints import Checkpoints
from headavatar.training.device_data import DeviceViews
from headavatar.training.views import Views, load_views

log = logging.getLogger(__name__)


def self_reenactment_iou(trainer: MeshHeadTrainer, held: Views) -> float:
    """Silhouette IoU on frames of held-out sequences (never trained on), every camera, by their own fits.

    The trainer scores what it holds (``views`` and, where it keeps them on the device, ``data``):
    both are pointed at the held-out frames for the call, and a check that a batch really comes
    from them guards against scoring training frames should the trainer keep its data elsewhere.
    """
    saved = {k: getattr(trainer, k) for k in ("views", "data") if hasattr(trainer, k)}
    trainer.views = held
    if "data" in saved:
        trainer.data = DeviceViews(held, trainer.device)
    try:
        last = len(held.folders) - 1
        mask = trainer.batch(torch.tensor([last]), torch.tensor([0]))["mask"][0].float().cpu().numpy()
        if np.abs(mask - held.masks[last, 0] / 255.0).max() > 1e-3:
            raise PipelineError("meshhead.holdout_sequences: the trainer did not take the held-out frames")
        return trainer.silhouette_iou(list(range(len(held.cameras))))
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


class MeshHeadStage(Stage):
    name = "meshhead"
    inputs = ("sample", "matting", "fitting")
    config_sections = ("capture", "extract", "meshhead")
    # bump when outputs change (docs/caching.md); 2: bf16, batched views, videos; 3: .npz bytes; 4: the plateau
    # rule's best check's weights are kept, not the last step's
    code_version = 4
    volatile_outputs = ("history.json", "checkpoints/*")  # CPU/GPU samples differ on every run

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config.meshhead
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        views, held_views = load_views(ctx, cfg.render_size, cfg.render_size <= ctx.config.extract.lowres_size,
                                       cfg.holdout_sequences, "meshhead.holdout_sequences")
        first = ctx.input_key("fitting", f"params/{views.folders[0]}/vertices.npy")
        model = init_model(cfg, views, npy_array(ctx.store.get_bytes(first), ctx.store.uri(first)))
        raster = build_mesh_rasterizer(cfg.rasterizer, cfg.edge_softness_px)
        trainer = MeshHeadTrainer(model, views, cfg, raster, device)
        checkpoints = Checkpoints(ctx, cfg.keep_checkpoint_every, ceiling=cfg.steps)
        saved = checkpoints.load()
        if saved is not None:
            trainer.load_state_dict(saved)
            log.info("%s/meshhead: resuming from the checkpoint at step %d", ctx.capture, trainer.state.step)
        log.info("%s/meshhead: %d frames, %d training + %d held-out cameras, at most %d steps on %s; plateau rule: %s",
                 ctx.capture, len(views.folders), len(trainer.train_cams), len(trainer.held_cams), cfg.steps, device,
                 trainer.plateau_text())
        state = trainer.train(save=checkpoints.save)

        with torch.no_grad():
            verts, faces, _ = model.neutral()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "n_exp": int(views.exp.shape[1]),
                    "config": cfg.model_dump(mode="json")}, buf)
        ctx.outputs.put_bytes("model.pt", buf.getvalue())
        ctx.outputs.put_bytes("neutral_mesh.npz", npz_bytes(vertices=model.to_canonical(verts).cpu().numpy().astype(
            np.float32), faces=faces.cpu().numpy().astype(np.int32)))
        ctx.outputs.put_bytes("history.json", json.dumps(trainer.history()).encode())
        self._pictures(ctx, trainer)
        last, kept = state.history[-1], state.kept_eval()
        ctx.metrics.update({
            **trainer.schedule(), "resumed_from_step": state.resumed_from,
            "train_steps_per_s": state.steps_per_s, "holdout_iou": kept["holdout_iou"],
            "holdout_psnr": kept["holdout_psnr"],
            "train_iou": trainer.silhouette_iou(trainer.train_cams[:: max(1, len(trainer.train_cams) // 4)]),
            "mesh_vertices": len(verts), "mesh_faces": len(faces),
            **{f"final_{k}": v for k, v in last.items() if k != "step"},
        })
        if held_views is not None:
            ctx.metrics["self_reenactment_iou"] = self_reenactment_iou(trainer, held_views)
            log.info("%s/meshhead: held-out sequences' silhouette IoU %.4f (all cameras)", ctx.capture,
                     ctx.metrics["self_reenactment_iou"])
        log.info("%s/meshhead: held-out silhouette IoU %.4f", ctx.capture, ctx.metrics["holdout_iou"])

    @staticmethod
    def _pictures(ctx: StageContext, trainer: MeshHeadTrainer) -> None:
        cams = trainer.held_cams or trainer.train_cams[:2]
        views = trainer.views
        for f in sorted({0, len(views.folders) - 1}):
            rows = []
            with torch.no_grad():
                b = trainer.batch(torch.tensor([f] * len(cams)), torch.tensor(cams))
                r = render(trainer.model, trainer.raster, b, views.size, normals=True)
            for i in range(len(cams)):
                gt = (b["image"][i] * b["mask"][i, ..., None]).cpu().numpy()
                rgb = r.rgb[i].cpu().numpy()
                # OpenCV camera axes -> the usual normal-map colours (x right, y up, z towards the viewer).
                nrm = ((r.normals[i] * torch.tensor([1.0, -1.0, -1.0], device=r.normals.device) + 1) / 2
                       * r.hit[i, ..., None]).cpu().numpy()
                rows.append(np.hstack([gt, rgb, nrm]))
            sheet = (np.clip(np.vstack(rows), 0, 1) * 255).astype(np.uint8)[..., ::-1]
            if sheet.shape[0] < 384:
                sheet = cv2.resize(sheet, None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
            ctx.outputs.put_bytes(f"renders/{views.folders[f]}.jpg", encode_jpg(sheet, 92))
