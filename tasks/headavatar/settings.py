"""The pipeline configuration: one schema, loaded from ``config/pipeline.yaml`` plus overlays.

Every section is a frozen pydantic model with ``extra="forbid"``, so a typo or an out-of-range
value fails at load time with a one-line error naming the key. A stage's cache key includes the
digest of exactly the sections it declares (:data:`headavatar.stages.Stage.config_sections`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from headavatar.errors import ConfigError

NERSEMBLE_CAMERAS = (
    "220700191", "221501007", "222200036", "222200037", "222200038", "222200039",
    "222200040", "222200041", "222200042", "222200043", "222200044", "222200045",
    "222200046", "222200047", "222200048", "222200049",
)

PositiveInt = Annotated[int, Field(gt=0)]
DeviceName = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = CUDA when present")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(Section):
    """Where data lives. Credentials are never here: boto3 takes them from the environment."""

    endpoint_url: str | None = Field(None, description="S3 endpoint; None means AWS S3")
    bucket: str = Field("headavatar", min_length=3, max_length=63)
    prefix: str = Field("nersemble", description="key prefix for raw/ and avatars/")
    region: str = "us-east-1"
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 16
    multipart_threshold_mb: Annotated[int, Field(ge=5, le=5120)] = 16
    multipart_chunk_mb: Annotated[int, Field(ge=5, le=5120)] = 16
    max_attempts: Annotated[int, Field(ge=1, le=50)] = 10
    lock_ttl_s: Annotated[float, Field(ge=5, le=3600)] = 90  # a stage lease not renewed this long is free

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, v: str) -> str:
        v = v.strip("/")
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v


class CaptureConfig(Section):
    """What a raw NeRSemble capture holds and which parts of it are used."""

    cameras: tuple[str, ...] = NERSEMBLE_CAMERAS
    skip_sequence_keywords: tuple[str, ...] = ("tongue", "GLASSES", "FREE", "BACKGROUND")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2 or len(set(v)) != len(v) or not all(c.isdigit() for c in v):
            raise ValueError("must be at least 2 distinct numeric camera serials")
        return v


class ExtractConfig(Section):
    """Stage 1. Crop box in source pixels, then a resize to ``output_size`` (reference values)."""

    frame_stride: PositiveInt = 3
    crop_left: int = -200
    crop_top: int = 304
    crop_size: PositiveInt = 2600
    output_size: PositiveInt = 2048
    lowres_size: PositiveInt = 256
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 95
    workers: Annotated[int, Field(ge=0, le=256)] = Field(0, description="0 = one per core")


class SampleConfig(Section):
    """Stage 2: keep every ``frame_stride``-th extracted frame."""

    frame_stride: PositiveInt = 10


class MattingConfig(Section):
    """Stage 3. ``bmv2`` = BackgroundMattingV2 MattingRefine (reference settings); ``classical`` needs no weights."""

    method: Literal["bmv2", "classical"] = "bmv2"
    weights: str | None = Field(None, description="checkpoint path or s3://bucket/key (pytorch_resnet101.pth)")
    backbone: Literal["resnet101", "resnet50"] = "resnet101"
    backbone_scale: Annotated[float, Field(gt=0, le=0.5)] = 0.25
    refine_mode: Literal["sampling", "thresholding", "full"] = "sampling"
    refine_sample_pixels: Annotated[int, Field(ge=16, le=16_777_216)] = 80_000
    refine_threshold: Annotated[float, Field(ge=0, le=1)] = 0.1
    batch_size: Annotated[int, Field(ge=1, le=64)] = 8
    precision: Literal["fp32", "fp16"] = "fp16"  # fp16 only takes effect on CUDA
    device: DeviceName = "auto"
    classical_threshold: Annotated[float, Field(ge=0, le=255)] = 0.0  # 0 = automatic (Otsu)
    classical_low_threshold: Annotated[float, Field(ge=0, le=255)] = 4.0  # hysteresis floor
    guided_radius: Annotated[int, Field(ge=1, le=64)] = 8
    guided_eps: Annotated[float, Field(gt=0, le=1)] = 1e-3


class LandmarksConfig(Section):
    """Stage 4a: 68 iBUG-convention 2D landmarks per kept image.

    ``face_alignment`` is the reference's 2D-FAN (fetches its weights on first use);
    ``dlib`` runs offline from models shipped in a registry package; ``ground_truth`` projects a
    synthetic capture's true 3D landmarks (plus ``truth_noise_px`` Gaussian noise) — for scoring
    the fitting and for the demo, where no real face is filmed.
    """

    detector: Literal["face_alignment", "dlib", "ground_truth"] = "face_alignment"
    detect_size: Annotated[int, Field(ge=64, le=4096)] = 512  # images are downscaled to this for detection
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.2  # mean point confidence below = no face
    truth_noise_px: Annotated[float, Field(ge=0, le=50)] = 1.0
    truth_max_angle_deg: Annotated[float, Field(gt=0, le=180)] = 90.0  # face turned further from a camera = missed
    fan_face_detector: Literal["blazeface", "sfd"] = "blazeface"  # face_alignment's face detector (reference)
    device: DeviceName = "auto"
    overlay_frames: Annotated[int, Field(ge=0, le=100)] = 3  # contact sheets written (first, ..., last frame)


class FittingConfig(Section):
    """Stage 4b: multiview BFM09 fitting to the landmarks (reference weights and learning rates)."""

    face_model: str | None = Field(
        None, description="BFM09_model_info.mat: path, s3://bucket/key, or 'synthetic' (the synthetic capture's)")
    min_views: Annotated[int, Field(ge=2, le=64)] = 2  # cameras with a face needed to fit a frame
    exclude_landmarks: tuple[Annotated[int, Field(ge=0, le=67)], ...] = (48, 54)  # as the reference
    reg_id_weight: Annotated[float, Field(ge=0)] = 1e-7
    reg_exp_weight: Annotated[float, Field(ge=0)] = 1e-7
    pose_steps: Annotated[int, Field(ge=0, le=100_000)] = 1000  # Adam on pose + scale only
    pose_lr: Annotated[float, Field(gt=0, le=1)] = 1e-2
    scale_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    all_steps: Annotated[int, Field(ge=0, le=100_000)] = 4000  # Adam on everything
    all_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    tolerance: Annotated[float, Field(ge=0)] = 1e-10  # stop a phase when the loss changes less than this
    device: DeviceName = "auto"


class MeshHeadConfig(Section):
    """Stage 5: GHA mesh head (reference values: train_meshhead_N031.yaml; loss weights from its trainer)."""

    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    views_per_step: Annotated[int, Field(ge=1, le=64)] = 4
    render_size: Annotated[int, Field(ge=16, le=2048)] = 256
    grid_resolution: Annotated[int, Field(ge=4, le=256)] = 64  # cubes per side; 6 tetrahedra per cube
    bbox_margin: Annotated[float, Field(ge=1, le=4)] = 1.3  # model box = fitted head box grown by this
    pos_freqs: Annotated[int, Field(ge=0, le=16)] = 4
    hidden: Annotated[int, Field(ge=8, le=1024)] = 256
    geo_layers: Annotated[int, Field(ge=1, le=16)] = 5
    features: Annotated[int, Field(ge=1, le=512)] = 128
    deform_scale: Annotated[float, Field(gt=0, le=1)] = 0.3  # max expression/pose offset, fraction of box half-size
    near_face: Annotated[float, Field(ge=0, le=2)] = 0.1  # pose deformation fades in from here (box units) ...
    far_from_face: Annotated[float, Field(ge=0, le=2)] = 0.25  # ... to here, measured from the nearest landmark
    lr_net: Annotated[float, Field(gt=0, le=1)] = 1e-3
    lr_landmarks: Annotated[float, Field(gt=0, le=1)] = 1e-4
    w_rgb: Annotated[float, Field(ge=0)] = 0.1
    w_silhouette: Annotated[float, Field(ge=0)] = 0.1
    w_landmark_deform: Annotated[float, Field(ge=0)] = 1.0
    w_landmark_sdf: Annotated[float, Field(ge=0)] = 0.1
    w_offset: Annotated[float, Field(ge=0)] = 0.01
    w_laplacian: Annotated[float, Field(ge=0)] = 100.0
    edge_softness_px: Annotated[float, Field(gt=0, le=8)] = 0.5  # soft-silhouette sigma
    # torch runs anywhere and was the faster on an H100 (README, Stage 5); pytorch3d (BSD) when installed
    rasterizer: Literal["torch", "pytorch3d"] = "torch"
    holdout_cameras: tuple[str, ...] = ("222200039", "222200044")  # never trained on; scored and pictured
    eval_every: Annotated[int, Field(ge=0)] = 1000  # held-out silhouette IoU every N steps (0 = at the end only)
    checkpoint_every: Annotated[int, Field(ge=1)] = 500  # resumable state, overwritten
    keep_checkpoint_every: Annotated[int, Field(ge=0)] = 2500  # also published as checkpoints/step-N.pt (0 = never)
    seed: int = 0
    device: DeviceName = "auto"


class GaussianHeadConfig(Section):
    """Stage 6: GHA Gaussian head + super-resolution (reference: train_gaussianhead_N031.yaml and its trainer)."""

    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    views_per_step: Annotated[int, Field(ge=1, le=64)] = 1
    coarse_size: Annotated[int, Field(ge=16, le=4096)] = 512  # 32-channel splatting resolution
    fine_size: Annotated[int, Field(ge=16, le=4096)] = 2048  # super-resolution output (must be coarse * 2^k)
    features: Annotated[int, Field(ge=1, le=256)] = 32  # channels rendered; the first 3 are RGB
    mouth_points: Annotated[int, Field(ge=0, le=100_000)] = 3000
    hidden: Annotated[int, Field(ge=8, le=1024)] = 256
    pos_freqs: Annotated[int, Field(ge=0, le=16)] = 4
    deform_scale: Annotated[float, Field(gt=0, le=1)] = 0.3
    attributes_scale: Annotated[float, Field(gt=0, le=1)] = 0.2
    near_face: Annotated[float, Field(ge=0, le=2)] = 0.1
    far_from_face: Annotated[float, Field(ge=0, le=2)] = 0.25
    sr_channels: Annotated[int, Field(ge=4, le=512)] = 32
    lr_net: Annotated[float, Field(gt=0, le=1)] = 1e-4
    lr_pose: Annotated[float, Field(ge=0, le=1)] = 1e-5  # per-frame pose refinement (0 = off)
    w_rgb_low: Annotated[float, Field(ge=0)] = 1.0
    w_rgb_high: Annotated[float, Field(ge=0)] = 1.0
    w_perceptual: Annotated[float, Field(ge=0)] = 0.1
    lpips_weights: str | None = Field(None, description="LPIPS-VGG weights (path or s3://); unset = SSIM stand-in")
    # auto = gsplat on CUDA when installed; dgr = diff-gaussian-rasterization built with 32 channels (non-commercial)
    rasterizer: Literal["auto", "gsplat", "dgr", "torch"] = "auto"
    holdout_cameras: tuple[str, ...] = ("222200039", "222200044")
    eval_every: Annotated[int, Field(ge=0)] = 5000
    checkpoint_every: Annotated[int, Field(ge=1)] = 1000  # resumable state, overwritten
    keep_checkpoint_every: Annotated[int, Field(ge=0)] = 25_000  # also published as checkpoints/step-N.pt (0 = never)
    seed: int = 0
    device: DeviceName = "auto"


class PipelineConfig(Section):
    storage: StorageConfig = StorageConfig()
    capture: CaptureConfig = CaptureConfig()
    extract: ExtractConfig = ExtractConfig()
    sample: SampleConfig = SampleConfig()
    matting: MattingConfig = MattingConfig()
    landmarks: LandmarksConfig = LandmarksConfig()
    fitting: FittingConfig = FittingConfig()
    meshhead: MeshHeadConfig = MeshHeadConfig()
    gaussianhead: GaussianHeadConfig = GaussianHeadConfig()

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
        data = deep_merge(data, _read_yaml(cdir / "profiles" / f"{profile}.yaml"))
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
        else:
            got = repr(err.get("input"))
            parts.append(f"{key}: {err['msg']} (got {got[:60]})")
    return "invalid config: " + "; ".join(parts)
