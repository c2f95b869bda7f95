"""The pipeline configuration: one schema, loaded from ``config/pipeline.yaml`` plus overlays.

Every section is a frozen pydantic model with ``extra="forbid"``, so a typo or an out-of-range
value fails at load time with a one-line error naming the key. A stage's cache key includes the
result settings of exactly the sections it declares (:data:`headavatar.stages.Stage.config_sections`):
every setting but those marked :func:`execution`, and those marked :func:`added_later` at their default.
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from headavatar.errors import ConfigError

NERSEMBLE_CAMERAS = (
    "220700191", "221501007", "222200036", "222200037", "222200038", "222200039",
    "222200040", "222200041", "222200042", "222200043", "222200044", "222200045",
    "222200046", "222200047", "222200048", "222200049",
)

PositiveInt = Annotated[int, Field(gt=0)]
DeviceName = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = CUDA when present")]
# The plateau rule of stages 5 and 6 (headavatar.training.plateau): ``steps`` is a ceiling and training ends
# when the held-out PSNR stops rising. These settings change what is trained, so unlike eval_every they key
# the cache; each stage sets its own defaults.
PlateauEvery = Annotated[int, Field(
    ge=0, description="held-out check of the plateau rule every N steps (0 = off: train all `steps`)")]
PlateauChecks = Annotated[int, Field(
    ge=1, le=100, description="stop when the best held-out PSNR of the last K checks ...")]
PlateauGainDb = Annotated[float, Field(
    ge=0, le=10, description="... beats the best before them by less than this many dB")]
PlateauMinSteps = Annotated[int, Field(ge=0, description="never stop before this step")]


# A setting marked execution changes how a stage runs, not what it computes (a device, a worker count,
# how often to checkpoint): it stays out of the stage's cache key (contract/config_key.py), so changing
# it on a retry keeps the finished outputs and resumes training from its checkpoint.
EXECUTION, ADDED_LATER = "execution", "added_later"  # the marks, in a field's json_schema_extra
# A training's step ceiling is a result setting (another ceiling, other weights), but it only ends the loop (no
# schedule depends on it): a checkpoint of the same training under a lower ceiling is one under a higher one too,
# so raising it continues the training instead of starting over (training/checkpoints.py).
CEILING = "ceiling"


def execution(default: Any, **kwargs: Any) -> Any:
    """``Field(default, ...)`` for an execution setting."""
    return Field(default, json_schema_extra={EXECUTION: True}, **kwargs)


def added_later(default: Any, **kwargs: Any) -> Any:
    """``Field(default, ...)`` for a setting added to a section after captures were processed.

    At ``default`` (which must reproduce what the stage did before the setting existed) it stays
    out of the cache key, so manifests and checkpoints written before it existed stay valid.
    """
    return Field(default, json_schema_extra={ADDED_LATER: True}, **kwargs)


def ceiling(default: Any, **kwargs: Any) -> Any:
    """``Field(default, ...)`` for a training's step ceiling (:data:`CEILING`)."""
    return Field(default, json_schema_extra={CEILING: True}, **kwargs)


def marked(field: FieldInfo, mark: str) -> bool:
    """Whether a setting carries ``mark`` (:data:`EXECUTION`, :data:`ADDED_LATER` or :data:`CEILING`)."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(mark))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(Section):
    """Where data lives. Credentials are never here: boto3 takes them from the environment."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint URL; null = AWS S3. $HEADAVATAR_S3_ENDPOINT overrides")
    bucket: str = Field(
        "headavatar", min_length=3, max_length=63,
        description="bucket holding raw captures and every stage's outputs. $HEADAVATAR_S3_BUCKET overrides")
    prefix: str = Field(
        "nersemble", description="key prefix under which raw/ and avatars/ live. $HEADAVATAR_S3_PREFIX overrides")
    region: str = Field("us-east-1", description="S3 region name given to boto3")
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        16, description="objects transferred at once in a batch upload/download")
    multipart_threshold_mb: Annotated[int, Field(ge=5, le=5120)] = Field(
        16, description="files above this size (MB) go as multipart uploads and copies")
    multipart_chunk_mb: Annotated[int, Field(ge=5, le=5120)] = Field(
        16, description="part size (MB) of multipart uploads")
    max_attempts: Annotated[int, Field(ge=1, le=50)] = Field(
        10, description="boto3 attempts per request (with backoff) before a stage exits 75 (retryable)")
    lock_ttl_s: Annotated[float, Field(ge=5, le=3600)] = Field(
        90, description="a stage lease not renewed for this many seconds is free (its holder died)")
    keep_variants: Annotated[int, Field(ge=0, le=1000)] = Field(
        3, description="earlier results kept per stage of a capture, each under its cache key, when a run with "
                       "other settings or inputs replaces them (going back to those settings brings one back "
                       "without computing), and as many unfinished trainings (going back resumes them); the oldest "
                       "beyond this many are removed; 0 keeps none")

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, v: str) -> str:
        v = v.strip("/")
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v


SequencePattern = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_*?\[\]!+.-]+$")]


class CaptureConfig(Section):
    """What a raw NeRSemble capture holds and which parts of it are used.

    Sequences are selected by name (``EXP-1-head``, ``SEN-01-...``; the same in both raw layouts)
    with shell-style patterns, case-sensitive: a sequence is used when it matches an
    ``include_sequences`` pattern and no ``exclude_sequences`` pattern. The default exclusions
    are the reference's: tongue sequences, GLASSES, FREE and the background plates.
    """

    cameras: tuple[str, ...] = Field(
        NERSEMBLE_CAMERAS,
        description="the capture's camera serials; every one must have a video per used sequence and "
        "a background plate")
    include_sequences: tuple[SequencePattern, ...] = Field(
        ("*",), description="sequence name patterns (shell-style, case-sensitive) to use")
    exclude_sequences: tuple[SequencePattern, ...] = Field(
        ("*tongue*", "GLASSES*", "FREE*", "BACKGROUND*"),
        description="sequence name patterns never used, even when included")

    @field_validator("cameras", mode="before")
    @classmethod
    def _serials_as_text(cls, v: Any) -> Any:
        """``--set 'capture.cameras=[222200036, ...]'`` parses serials as YAML integers."""
        return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v] \
            if isinstance(v, list | tuple) else v

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2 or len(set(v)) != len(v) or not all(c.isdigit() for c in v):
            raise ValueError("must be at least 2 distinct numeric camera serials")
        return v


class ExtractConfig(Section):
    """Stage 1. Crop box in source pixels, then a resize to ``output_size`` (reference values)."""

    frame_stride: PositiveInt = Field(3, description="every N-th video frame is an extracted frame")
    crop_left: int = Field(
        -200, description="left edge of the square crop box in source pixels (may be negative: black padding)")
    crop_top: int = Field(304, description="top edge of the crop box in source pixels")
    crop_size: PositiveInt = Field(2600, description="side of the square crop box in source pixels")
    output_size: PositiveInt = Field(2048, description="side of the images written (px), resized from the crop")
    lowres_size: PositiveInt = Field(
        256, description="side of the low-resolution copies (px), resized from the output image")
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = Field(
        95, description="JPEG quality of the images written (95 = cv2.imwrite's default, as the reference)")
    workers: Annotated[int, Field(ge=0, le=256)] = execution(
        0, description="camera processes decoding in parallel; 0 = one per core")
    prefetch_videos: Annotated[int, Field(ge=0, le=256)] = execution(
        2, description="raw videos fetched ahead of the camera processes; scratch holds at most workers + this many "
        "videos (each with its camera's plate), each deleted once decoded")
    # NeRSemble v2 ships color_calibration.json (one matrix per camera); the dataset authors recommend applying it.
    color_correction: bool = Field(True, description="apply color_calibration.json to frames and plates when present")


class IngestConfig(Section):
    """When the ingestion DAG counts an upload as finished (``docs/data.md``: the completion marker).

    A capture is finished when its ``_COMPLETE`` marker is not older than any of its raw objects
    (the upload writes it last), or, without such a marker, when no raw object of it changed for
    ``quiet_minutes``: a fallback for uploads that do not write the marker.
    """

    quiet_minutes: Annotated[float, Field(ge=0, le=10080)] | None = Field(
        60, description="without an up-to-date _COMPLETE marker, a capture counts as uploaded once none of its "
        "raw objects changed for this long (minutes); null = wait for the marker")


class SampleConfig(Section):
    """Stage 2: keep every ``frame_stride``-th extracted frame."""

    frame_stride: PositiveInt = Field(
        10, description="keep every N-th extracted frame (with extract.frame_stride 3: video frames 0, 30, 60, ...)")


class MattingConfig(Section):
    """Stage 3. ``bmv2`` = BackgroundMattingV2 MattingRefine (reference settings); ``classical`` needs no weights."""

    method: Literal["bmv2", "classical"] = Field(
        "bmv2",
        description="bmv2 = BackgroundMattingV2 MattingRefine (needs weights); classical = "
        "background difference, no weights")
    weights: str | None = Field(None, description="checkpoint path or s3://bucket/key (pytorch_resnet101.pth)")
    backbone: Literal["resnet101", "resnet50"] = Field(
        "resnet101", description="MattingRefine backbone; must match the checkpoint")
    backbone_scale: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.25, description="the coarse pass runs at this fraction of the image size")
    refine_mode: Literal["sampling", "thresholding", "full"] = Field(
        "sampling", description="which pixels the refiner recomputes at full resolution")
    refine_sample_pixels: Annotated[int, Field(ge=16, le=16_777_216)] = Field(
        80_000, description="pixels refined per image in the 'sampling' refine mode")
    refine_threshold: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="error threshold of the 'thresholding' refine mode")
    batch_size: Annotated[int, Field(ge=1, le=64)] = execution(8, description="frames per GPU batch")
    precision: Literal["fp32", "fp16"] = execution(
        "fp16", description="fp16 takes effect on CUDA only; the CPU always runs fp32")
    device: DeviceName = execution("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present)")
    classical_threshold: Annotated[float, Field(ge=0, le=255)] = Field(
        0.0, description="classical: difference to the plate (8-bit levels) that counts as subject; 0 = Otsu")
    classical_low_threshold: Annotated[float, Field(ge=0, le=255)] = Field(
        4.0, description="classical: hysteresis floor; fainter differences count only where they join clear ones")
    guided_radius: Annotated[int, Field(ge=1, le=64)] = Field(
        8, description="classical: guided-filter radius at 2048 px (scaled with the image)")
    guided_eps: Annotated[float, Field(gt=0, le=1)] = Field(
        1e-3, description="classical: guided-filter regularisation; smaller follows image edges more closely")


class LandmarksConfig(Section):
    """Stage 4a: 68 iBUG-convention 2D landmarks per kept image.

    ``dlib`` (the default) is dlib's HOG face detector and 68-point shape predictor, whose model file
    is a pinned asset (size and sha256 checked) and the one detector tested here on photographs
    (docs/stages/fitting.md says why); ``face_alignment`` is the reference's 2D-FAN (fetches its
    weights on first use); ``ground_truth`` projects a synthetic capture's true 3D landmarks (plus
    ``truth_noise_px`` Gaussian noise) — for scoring the fitting and for the demo, where no real face
    is filmed.
    """

    detector: Literal["face_alignment", "dlib", "ground_truth"] = Field(
        "dlib",
        description="dlib = offline, its model an asset (landmarks.dlib_model); face_alignment = 2D-FAN "
        "(downloads weights once); ground_truth = synthetic captures")
    detect_size: Annotated[int, Field(ge=64, le=4096)] = Field(
        512, description="images are downscaled to this side (px) for detection; points are scaled back")
    min_confidence: Annotated[float, Field(ge=0, le=1)] = Field(
        0.2, description="a face whose mean point confidence is below this counts as missing")
    truth_noise_px: Annotated[float, Field(ge=0, le=50)] = Field(
        1.0, description="ground_truth: Gaussian noise (px) added to the projected true landmarks")
    truth_max_angle_deg: Annotated[float, Field(gt=0, le=180)] = Field(
        90.0, description="ground_truth: a camera the face is turned further from than this misses the face")
    dlib_threshold: Annotated[float, Field(ge=-2, le=2)] = Field(
        -0.8, description="dlib: face score threshold (its adjust_threshold); below 0 keeps the weaker detections "
        "of faces turned 30-50 degrees away, which 0 drops")
    dlib_model: str = added_later(
        "asset:dlib68", description="dlib: the 68-point shape predictor, asset:dlib68 (`headavatar assets put "
        "dlib68 FILE`), a path or s3://bucket/key; checked against its pinned size and sha256. Trained on iBUG "
        "300-W, whose licence allows non-commercial use only")
    fan_face_detector: Literal["blazeface", "sfd"] = Field(
        "blazeface", description="face_alignment's face detector (blazeface as the reference)")
    device: DeviceName = execution("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present)")
    overlay_frames: Annotated[int, Field(ge=0, le=100)] = Field(
        3, description="landmark and fit contact sheets written (first, ..., last frame)")


class FittingConfig(Section):
    """Stage 4b: multiview BFM09 fitting to the landmarks (reference weights and learning rates)."""

    face_model: str | None = Field(
        None, description="BFM09_model_info.mat: path, s3://bucket/key, or 'synthetic' (the synthetic capture's)")
    min_views: Annotated[int, Field(ge=2, le=64)] = Field(
        2, description="cameras with a detected face needed to fit a frame; other frames are excluded")
    exclude_landmarks: tuple[Annotated[int, Field(ge=0, le=67)], ...] = Field(
        (48, 54), description="landmark indices left out of the fit (48, 54: mouth corners, as the reference)")
    reg_id_weight: Annotated[float, Field(ge=0)] = Field(
        1e-7, description="L2 regularisation of the identity coefficients")
    reg_exp_weight: Annotated[float, Field(ge=0)] = Field(
        1e-7, description="L2 regularisation of the expression coefficients")
    pose_steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        1000, description="Adam steps on pose + scale only (phase 1)")
    pose_lr: Annotated[float, Field(gt=0, le=1)] = Field(1e-2, description="phase 1 learning rate of the pose")
    scale_lr: Annotated[float, Field(gt=0, le=1)] = Field(1e-3, description="phase 1 learning rate of the scale")
    all_steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        4000, description="Adam steps on every parameter (phase 2)")
    all_lr: Annotated[float, Field(gt=0, le=1)] = Field(1e-3, description="phase 2 learning rate")
    tolerance: Annotated[float, Field(ge=0)] = Field(
        1e-10, description="a phase stops when the loss changes less than this")
    device: DeviceName = execution("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present)")


class MeshHeadConfig(Section):
    """Stage 5: GHA mesh head (reference values: train_meshhead_N031.yaml; loss weights from its trainer)."""

    steps: Annotated[int, Field(ge=1, le=1_000_000)] = ceiling(
        10_000,
        description="training steps at most (the plateau rule may stop sooner); raising it continues training")
    views_per_step: Annotated[int, Field(ge=1, le=64)] = Field(4, description="random training views per step")
    render_size: Annotated[int, Field(ge=16, le=2048)] = Field(
        256, description="side (px) the training views are rendered and compared at")
    grid_resolution: Annotated[int, Field(ge=4, le=256)] = Field(
        64, description="cubes per side of the deformable tetrahedral grid (6 tetrahedra per cube)")
    bbox_margin: Annotated[float, Field(ge=1, le=4)] = Field(
        1.3, description="the model box is the fitted head's box grown by this factor")
    pos_freqs: Annotated[int, Field(ge=0, le=16)] = Field(
        4, description="positional-encoding frequencies of the MLP inputs")
    hidden: Annotated[int, Field(ge=8, le=1024)] = Field(256, description="width of the MLPs")
    geo_layers: Annotated[int, Field(ge=1, le=16)] = Field(5, description="layers of the geometry (SDF) MLP")
    features: Annotated[int, Field(ge=1, le=512)] = Field(
        128, description="feature channels per surface point (passed on to stage 6)")
    deform_scale: Annotated[float, Field(gt=0, le=1)] = Field(
        0.3, description="largest expression/pose offset, as a fraction of the box half-size")
    near_face: Annotated[float, Field(ge=0, le=2)] = Field(
        0.1, description="pose deformation fades in from this distance to the nearest landmark (box units) ...")
    far_from_face: Annotated[float, Field(ge=0, le=2)] = Field(
        0.25, description="... and is full from this distance on")
    lr_net: Annotated[float, Field(gt=0, le=1)] = Field(1e-3, description="learning rate of the networks")
    lr_landmarks: Annotated[float, Field(gt=0, le=1)] = Field(
        1e-4, description="learning rate of the canonical 3D landmarks")
    w_rgb: Annotated[float, Field(ge=0)] = Field(0.1, description="weight of the RGB L1 loss")
    w_silhouette: Annotated[float, Field(ge=0)] = Field(0.1, description="weight of the soft-silhouette IoU loss")
    w_landmark_deform: Annotated[float, Field(ge=0)] = Field(1.0, description="weight of the landmark deformation loss")
    w_landmark_sdf: Annotated[float, Field(ge=0)] = Field(0.1, description="weight of the SDF-at-landmarks loss")
    w_offset: Annotated[float, Field(ge=0)] = Field(0.01, description="weight of the offset regulariser")
    w_laplacian: Annotated[float, Field(ge=0)] = Field(
        100.0, description="weight of the uniform Laplacian smoothness loss")
    edge_softness_px: Annotated[float, Field(gt=0, le=8)] = Field(0.5, description="soft-silhouette sigma (px)")
    # torch runs anywhere and was the faster on an H100 (docs/stages/meshhead.md); pytorch3d (BSD) when installed
    rasterizer: Literal["torch", "pytorch3d"] = execution(
        "torch", description="torch (anywhere; the faster on an H100) or pytorch3d (BSD, when installed)")
    precision: Literal["fp32", "bf16"] = execution(
        "bf16", description="bf16 = MLP matmuls under autocast on CUDA (geometry stays fp32); fp32 everywhere else")
    compile: bool = execution(
        True, description="CUDA: MLPs, rasteriser shading, Laplacian under torch.compile (~3 min at step 1); CPU: no")
    holdout_cameras: tuple[str, ...] = Field(
        ("222200039", "222200044"), description="cameras never trained on; scored (silhouette IoU, PSNR) and pictured")
    # Sequences (name patterns) never trained on; every camera of them is scored (self-reenactment).
    holdout_sequences: tuple[SequencePattern, ...] = Field(
        (), description="sequence name patterns never trained on; every camera of them is scored (self-reenactment)")
    eval_every: Annotated[int, Field(ge=0)] = execution(
        1000, description="held-out evaluation every N steps (0 = at the end only; the plateau rule's checks too)")
    # The plateau rule (PlateauEvery): stage 5 stops when its held-out PSNR stops rising.
    plateau_every: PlateauEvery = 1000
    plateau_checks: PlateauChecks = 3
    plateau_gain_db: PlateauGainDb = 0.1
    plateau_min_steps: PlateauMinSteps = 3000
    checkpoint_every: Annotated[int, Field(ge=1)] = execution(
        500, description="resumable state (_state/checkpoint.pt) every N steps, overwritten")
    keep_checkpoint_every: Annotated[int, Field(ge=0)] = execution(
        2500, description="also published as checkpoints/step-N.pt every N steps (0 = never)")
    seed: int = Field(0, description="random seed (sampler, initialisation); CPU training is bit-reproducible")
    device: DeviceName = execution("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present)")


class GaussianHeadConfig(Section):
    """Stage 6: GHA Gaussian head + super-resolution (reference: train_gaussianhead_N031.yaml and its trainer)."""

    steps: Annotated[int, Field(ge=1, le=10_000_000)] = ceiling(
        100_000,
        description="training steps at most (the plateau rule may stop sooner); raising it continues training")
    views_per_step: Annotated[int, Field(ge=1, le=64)] = Field(1, description="random training views per step")
    coarse_size: Annotated[int, Field(ge=16, le=4096)] = Field(
        512, description="side (px) of the 32-channel splatted image")
    fine_size: Annotated[int, Field(ge=16, le=4096)] = Field(
        2048, description="side (px) of the super-resolved output; must be coarse_size * 2^k")
    features: Annotated[int, Field(ge=1, le=256)] = Field(
        32, description="channels rendered per Gaussian; the first 3 are RGB")
    mouth_points: Annotated[int, Field(ge=0, le=100_000)] = Field(
        3000, description="extra Gaussians filling the mouth box around landmarks 48-65")
    hidden: Annotated[int, Field(ge=8, le=1024)] = Field(256, description="width of the MLPs")
    pos_freqs: Annotated[int, Field(ge=0, le=16)] = Field(
        4, description="positional-encoding frequencies of the MLP inputs")
    deform_scale: Annotated[float, Field(gt=0, le=1)] = Field(
        0.3, description="largest expression/pose offset, as a fraction of the box half-size")
    attributes_scale: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2, description="largest change of scale/rotation/opacity the MLPs may apply")
    near_face: Annotated[float, Field(ge=0, le=2)] = Field(
        0.1, description="pose deformation fades in from this distance to the nearest landmark (box units) ...")
    far_from_face: Annotated[float, Field(ge=0, le=2)] = Field(
        0.25, description="... and is full from this distance on")
    sr_channels: Annotated[int, Field(ge=4, le=512)] = Field(32, description="channels of the super-resolution network")
    lr_net: Annotated[float, Field(gt=0, le=1)] = Field(
        1e-4, description="learning rate of the networks (reference 1e-4)")
    lr_pose: Annotated[float, Field(ge=0, le=1)] = Field(
        1e-5, description="learning rate of the per-frame pose correction (0 = off)")
    w_rgb_low: Annotated[float, Field(ge=0)] = Field(1.0, description="weight of the L1 loss on the coarse RGB")
    w_rgb_high: Annotated[float, Field(ge=0)] = Field(
        1.0, description="weight of the L1 loss on the super-resolved image")
    w_perceptual: Annotated[float, Field(ge=0)] = Field(
        0.1, description="weight of the perceptual loss (LPIPS-VGG, or 1 - SSIM without weights)")
    lpips_weights: str | None = Field(None, description="LPIPS-VGG weights (path or s3://); unset = SSIM stand-in")
    # auto = gsplat on CUDA when installed; dgr = diff-gaussian-rasterization built with 32 channels (non-commercial)
    rasterizer: Literal["auto", "gsplat", "dgr", "torch"] = execution(
        "auto",
        description="auto = gsplat on CUDA when installed, else torch; dgr = 32-channel diff-gaussian-rasterization")
    precision: Literal["fp32", "bf16"] = execution(
        "bf16", description="bf16 = MLPs + super-resolution under autocast on CUDA; fp32 everywhere else")
    compile: bool = execution(
        True, description="CUDA: Gaussian MLPs, super-resolution + losses under torch.compile (~1 min at step 1)")
    ranks: Annotated[int, Field(ge=1, le=64)] = execution(
        1, description="processes training together, data-parallel: one per GPU (NCCL), or gloo on the CPU; "
                       "each takes views_per_step / ranks of a step's views")
    holdout_cameras: tuple[str, ...] = Field(
        ("222200039", "222200044"), description="cameras never trained on; scored (PSNR, SSIM, LPIPS) and pictured")
    holdout_sequences: tuple[SequencePattern, ...] = Field(
        (), description="sequence name patterns never trained on, as meshhead.holdout_sequences")
    eval_every: Annotated[int, Field(ge=0)] = execution(
        5000, description="held-out evaluation every N steps (0 = at the end only; the plateau rule's checks too)")
    # The plateau rule (PlateauEvery): stage 6 stops when the novel-view PSNR (else self-reenactment's)
    # stops rising.
    plateau_every: PlateauEvery = 5000
    plateau_checks: PlateauChecks = 3
    plateau_gain_db: PlateauGainDb = 0.1
    plateau_min_steps: PlateauMinSteps = 20_000
    checkpoint_every: Annotated[int, Field(ge=1)] = execution(
        1000, description="resumable state (_state/checkpoint.pt) every N steps, overwritten")
    keep_checkpoint_every: Annotated[int, Field(ge=0)] = execution(
        25_000, description="also published as checkpoints/step-N.pt every N steps (0 = never)")
    seed: int = Field(0, description="random seed (sampler, initialisation); CPU training is bit-reproducible")
    device: DeviceName = execution("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present)")

    @model_validator(mode="after")
    def _ranks_split_the_step(self) -> GaussianHeadConfig:
        """Checked when the config is loaded, so a run asking for more GPUs than its step has views fails at
        its first task, not after five stages and a wait for GPU leases."""
        if self.views_per_step % self.ranks:
            raise ValueError(f"gaussianhead.views_per_step ({self.views_per_step}) must be a multiple of "
                             f"gaussianhead.ranks ({self.ranks}): each rank takes an equal share of a step's views")
        if self.ranks > 1 and self.device.startswith("cuda:"):
            raise ValueError(f"gaussianhead.device {self.device} names one GPU but gaussianhead.ranks is "
                             f"{self.ranks}: use auto or cuda (rank r trains on the r-th GPU the stage sees)")
        return self


Hours = Annotated[float, Field(gt=0, le=24 * 60)]
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")]


class OrchestrationConfig(Section):
    """How Airflow runs the stages: time limits, Kubernetes pod requests (in no stage's cache key).

    Read when the DAG file is parsed (the profile from ``$HEADAVATAR_PROFILE``). A timeout is per attempt
    (a timed-out attempt is retried like any failure) and stops the stage, so a hung stage gives its GPU
    back. The defaults are generous for a full NeRSemble capture on one GPU.
    """

    dagrun_timeout_h: Hours = Field(
        168, description="a DAG run still running after this many hours fails, its running task stopped "
        "(counts queueing for a GPU slot and retries too)")
    extract_timeout_h: Hours = Field(8, description="stage 1 attempt time limit (decoding every video)")
    sample_timeout_h: Hours = Field(2, description="stage 2 attempt time limit")
    matting_timeout_h: Hours = Field(12, description="stage 3 attempt time limit")
    fitting_timeout_h: Hours = Field(12, description="stage 4 attempt time limit (landmarks + BFM fitting)")
    meshhead_timeout_h: Hours = Field(24, description="stage 5 attempt time limit (mesh-head training)")
    gaussianhead_timeout_h: Hours = Field(72, description="stage 6 attempt time limit (Gaussian-head training)")
    extract_cpu: Quantity = Field("8", description="kubernetes: CPUs requested by a stage 1 pod (decodes cameras "
                                  "in parallel)")
    extract_memory: Quantity = Field("16Gi", description="kubernetes: memory requested (and its limit) of a "
                                     "stage 1 pod")
    extract_ephemeral_storage: Quantity = Field("200Gi", description="kubernetes: node disk requested (and its "
                                                "limit) of a stage 1 pod: its scratch space")
    sample_cpu: Quantity = Field("1", description="kubernetes: CPUs requested by a stage 2 pod")
    sample_memory: Quantity = Field("2Gi", description="kubernetes: memory requested (and its limit), stage 2")
    sample_ephemeral_storage: Quantity = Field("10Gi", description="kubernetes: node disk requested (and its "
                                               "limit), stage 2")
    matting_cpu: Quantity = Field("4", description="kubernetes: CPUs requested by a stage 3 pod")
    matting_memory: Quantity = Field("32Gi", description="kubernetes: memory requested (and its limit), stage 3")
    matting_ephemeral_storage: Quantity = Field("50Gi", description="kubernetes: node disk requested (and its "
                                                "limit), stage 3")
    fitting_cpu: Quantity = Field("4", description="kubernetes: CPUs requested by a stage 4 pod")
    fitting_memory: Quantity = Field("16Gi", description="kubernetes: memory requested (and its limit), stage 4")
    fitting_ephemeral_storage: Quantity = Field("20Gi", description="kubernetes: node disk requested (and its "
                                                "limit), stage 4")
    meshhead_cpu: Quantity = Field("8", description="kubernetes: CPUs requested by a stage 5 pod")
    meshhead_memory: Quantity = Field("64Gi", description="kubernetes: memory requested (and its limit), stage 5")
    meshhead_ephemeral_storage: Quantity = Field("50Gi", description="kubernetes: node disk requested (and its "
                                                 "limit), stage 5")
    gaussianhead_cpu: Quantity = Field("8", description="kubernetes: CPUs requested by a stage 6 pod")
    gaussianhead_memory: Quantity = Field("64Gi", description="kubernetes: memory requested (and its limit), "
                                          "stage 6")
    gaussianhead_ephemeral_storage: Quantity = Field("50Gi", description="kubernetes: node disk requested (and "
                                                     "its limit), stage 6")


def sequence_selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether a sequence name passes include/exclude patterns (shell-style, case-sensitive)."""
    return any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)


def sequence_name(label: str) -> str:
    """``EXP-1-head_part-1`` (a frame index label) -> ``EXP-1-head``."""
    return re.sub(r"_part-\d+$", "", label)


class PipelineConfig(Section):
    storage: StorageConfig = StorageConfig()
    capture: CaptureConfig = CaptureConfig()
    ingest: IngestConfig = IngestConfig()
    extract: ExtractConfig = ExtractConfig()
    sample: SampleConfig = SampleConfig()
    matting: MattingConfig = MattingConfig()
    landmarks: LandmarksConfig = LandmarksConfig()
    fitting: FittingConfig = FittingConfig()
    meshhead: MeshHeadConfig = MeshHeadConfig()
    gaussianhead: GaussianHeadConfig = GaussianHeadConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    def section(self, name: str) -> Section:
        return getattr(self, name)


# --- loading -------------------------------------------------------------------------------

ENV_CONFIG_DIR = "HEADAVATAR_CONFIG_DIR"
ENV_PROFILE = "HEADAVATAR_PROFILE"
# Environment variables that override storage settings (the Airflow connection sets them).
STORAGE_ENV = {
    "HEADAVATAR_S3_ENDPOINT": "endpoint_url",
    "HEADAVATAR_S3_BUCKET": "bucket",
    "HEADAVATAR_S3_PREFIX": "prefix",
}


def config_dir() -> Path:
    """``$HEADAVATAR_CONFIG_DIR``, else the repository's ``config/`` (source checkouts)."""
    if os.environ.get(ENV_CONFIG_DIR):
        return Path(os.environ[ENV_CONFIG_DIR])
    return Path(__file__).resolve().parents[2] / "config"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _read_profile(cdir: Path, name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """``profiles/<name>.yaml``; one whose top-level ``extends: <other>`` is laid over that profile."""
    if name in seen:
        raise ConfigError(f"profile {name!r} extends itself: {' -> '.join((*seen, name))}")
    data = _read_yaml(cdir / "profiles" / f"{name}.yaml")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"profiles/{name}.yaml: extends must name one profile, not {parent!r}")
    return deep_merge(_read_profile(cdir, parent, (*seen, name)), data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``extract.frame_stride=2`` -> ``{"extract": {"frame_stride": 2}}`` (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    files: list[Path] | tuple[Path, ...] = (),
) -> PipelineConfig:
    """Defaults <- profile <- extra files <- environment (storage) <- ``key=value`` overrides."""
    cdir = config_dir()
    data = _read_yaml(cdir / "pipeline.yaml")
    profile = profile or os.environ.get(ENV_PROFILE) or None
    if profile:
        if not profile.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"invalid profile name {profile!r}")
        data = deep_merge(data, _read_profile(cdir, profile))
    for f in files:
        data = deep_merge(data, _read_yaml(Path(f)))
    env_storage = {field: os.environ[var] for var, field in STORAGE_ENV.items() if os.environ.get(var)}
    if env_storage:
        data = deep_merge(data, {"storage": env_storage})
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        elif isinstance(err.get("input"), dict):  # a rule across a section's settings: its message names them
            parts.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            got = repr(err.get("input"))
            parts.append(f"{key}: {err['msg']} (got {got[:60]})")
    return "invalid config: " + "; ".join(parts)
