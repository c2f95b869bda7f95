"""The whole pipeline on a GPU at real resolution, through the stage CLI the containers run, measured.

A synthetic capture at NeRSemble resolution (16 cameras, 2200x3208 videos, cropped to 2048x2048)
goes through ``headavatar run <stage>`` subprocesses against an embedded S3 server, with the
default profile except what cannot run on a machine without internet or licensed files (listed in
the results as ``overrides``). Per stage: wall time, peak GPU memory (NVML, whole device), peak
host memory (the stage's process tree), and the manifest's metrics (training steps/s, matting
frames/s, held-out PSNR/SSIM[/LPIPS]). Before the main stage-6 run, a short stage-6 run with each
rasteriser (gsplat, pure PyTorch) times a training step on the same data.

State lives under ``--home`` so the work can be split over several calls of a machine that stays
up (``--stages``); results accumulate in ``<home>/e2e_gpu.json`` and are copied to ``--out``.

``--real-size`` is the capture of a whole NeRSemble participant at the default profile (default
strides, training until the plateau rule stops it or the step ceiling): several sequences of 100
frames, the last one held out (self-reenactment) besides the profile's held-out cameras. Every stage
attempt is recorded as it runs (wall seconds, every 10 s), so a stage that ``--deadline``
(or a lost call) cuts short resumes from its checkpoint in the next call and its attempts add up.
Stages 5 and 6 also record their held-out curves (``history.json``); a stage stopped at the
deadline records its resumable checkpoint's step and curve so far.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from headavatar.bench.provenance import stamp
from headavatar.contract.outputs import state_key
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.errors import MissingObject, RefusedObject
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore
from headavatar.training.checkpoints import RESUMABLE, load_stored

log = logging.getLogger("headavatar.e2e")
CAPTURE, BUCKET = "090", "headavatar"
TEXTURE_MARKER = "capture_texture"  # in --home: the texture synth gave the capture
# Default profile, except: strides 1 so that 10 synthetic video frames give 10 kept frames (the
# default 3 x 10 would need 271 rendered frames per camera for the same work in stages 3-6), and
# what needs internet or licensed files: BackgroundMattingV2 weights, face_alignment's weights, BFM09.
OVERRIDES = ["extract.frame_stride=1", "sample.frame_stride=1", "matting.method=classical",
             "landmarks.detector=ground_truth", "fitting.face_model=synthetic"]
# ``--real-size``: default strides (every 30th video frame is trained on), NeRSemble's sequence names.
REAL_SIZE_OVERRIDES = [o for o in OVERRIDES if "frame_stride" not in o]
SEQUENCES = ("EXP-1-head", "EXP-2-eyes", "EXP-3-cheeks+nose", "EXP-4-lips", "EMO-1-shout+laugh",
             "EMO-2-surprise+fear", "EMO-3-angry+sad", "EMO-4-disgust+happy")


class PeakMonitor:
    """Peak GPU memory in use on device 0 (NVML) and peak RSS of a process tree, polled."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period = pid, period
        self.gpu_mib = self.host_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (a CPU smoke test): host memory only
            pynvml = handle = None
        while not self._stop.is_set():
            if handle is not None:
                self.gpu_mib = max(self.gpu_mib, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.host_mib = max(self.host_mib, rss / 2**20)
            except psutil.Error:
                pass
            self._stop.wait(self.period)


class Deadline(Exception):
    """The call's time ran out while a stage ran: the stage was stopped (SIGTERM) and resumes next call."""


def run_stage(env: dict[str, str], stage: str, extra: list[str], overrides: list[str] = OVERRIDES,
              force: bool = False, attempt: dict | None = None, save: Callable[[], None] = lambda: None,
              deadline: float = float("inf")) -> dict:
    """One ``headavatar run`` of ``stage``, measured. ``attempt`` (a dict already in the results) is
    updated every 10 s with the wall seconds so far and ``save`` is called, so an attempt cut
    short by a lost call is still counted. Past ``deadline`` (monotonic) the stage gets SIGTERM and
    ``Deadline`` is raised."""
    args = [sys.executable, "-m", "headavatar.cli", "run", stage, "--capture", CAPTURE]
    for o in [*overrides, *extra]:
        args += ["--set", o]
    if force:
        args.append("--force")
    attempt = {} if attempt is None else attempt
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env)
    with PeakMonitor(proc.pid) as peak:
        while (rc := _wait(proc, 10)) is None:
            attempt.update(wall_s=round(time.monotonic() - t0, 1), peak_gpu_mib=round(peak.gpu_mib),
                           peak_host_mib=round(peak.host_mib), state="running")
            save()
            if time.monotonic() > deadline:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                attempt.update(wall_s=round(time.monotonic() - t0, 1), state="stopped at the deadline")
                save()
                raise Deadline(stage)
    attempt.update(wall_s=round(time.monotonic() - t0, 1), peak_gpu_mib=round(peak.gpu_mib),
                   peak_host_mib=round(peak.host_mib), state="done" if rc == 0 else f"exit code {rc}")
    save()
    if rc != 0:
        raise SystemExit(f"stage {stage} failed with exit code {rc}")
    return {k: attempt[k] for k in ("wall_s", "peak_gpu_mib", "peak_host_mib")}


def _wait(proc: subprocess.Popen, seconds: float) -> int | None:
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def summed(attempts: list[dict]) -> dict:
    """A stage's attempts added up, up to the first that finished it (later ones are cache hits): those
    that ran it (done, stopped at the deadline, or cut short by a lost call: "running") sum their wall
    seconds, peaks are the largest; a failed attempt is listed, not counted. (CPU seconds are the
    manifest's ``cpu_s``, which counts stage 1's camera workers too.)"""
    done = next((i for i, a in enumerate(attempts) if a.get("state") == "done"), len(attempts) - 1)
    ran = [a for a in attempts[: done + 1] if a.get("state") in ("done", "stopped at the deadline", "running")]
    return {"wall_s": round(sum(a.get("wall_s", 0) for a in ran), 1), "attempts": len(attempts),
            "peak_gpu_mib": max((a.get("peak_gpu_mib", 0) for a in ran), default=0),
            "peak_host_mib": max((a.get("peak_host_mib", 0) for a in ran), default=0)}


def results_name(real: bool, detector: str, texture: str) -> str:
    """The results file: a non-default head texture is named, so runs of either texture are both kept."""
    named = [texture] if texture != default_texture(real, detector) else []
    parts = ["e2e", *(["real_size"] if real else []), *named, "gpu", *(["dlib"] if detector == "dlib" else [])]
    return "_".join(parts) + ".json"


def default_texture(real: bool, detector: str) -> str:
    """The photo texture for a real-size capture (what NeRSemble's faces look like to stages 3-6) and for
    dlib (which finds no face on the procedural one); the procedural one for the quick run."""
    return "astronaut" if real or detector == "dlib" else "procedural"


def so_far(store: ObjectStore, stage: str) -> dict:
    """A training stage stopped at the deadline: the step and held-out curve of its resumable checkpoint
    (where the next call goes on from), with the cache key it was trained under."""
    key = state_key(store.key(stage_prefix(CAPTURE, stage)), RESUMABLE)
    try:
        state = load_stored(store, key, "the next call starts the stage over", required=("step",))
    except MissingObject:
        return {"checkpoint_step": 0}
    except RefusedObject as e:  # recorded, not fatal: the stage's timing is still worth keeping
        return {"checkpoint_unreadable": str(e)[:300]}
    seconds, steps = state.get("timing", (0.0, 0))
    timing = {"ms_per_step": round(1000 * seconds / steps, 2)} if steps else {}
    return {"checkpoint_step": state["step"], "checkpoint_cache_key": state.get("cache_key"),
            "holdout_curve": state.get("evals", []), **timing}


def capture_texture(home: Path, asked: str | None, real: bool, detector: str) -> str:
    """The head texture of this ``--home``'s capture: the one ``synth`` recorded there (a later call that
    asks for another would mix two captures in one results file), else ``asked``, else the default."""
    marker = home / TEXTURE_MARKER
    made = marker.read_text().strip() if marker.exists() else None
    texture = asked or made or default_texture(real, detector)
    if made and texture != made:
        raise ValueError(f"{home} holds a capture with the {made} texture, not {texture}: use another --home")
    return texture


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--home", type=Path, default=Path("/tmp/headavatar-e2e"))
    p.add_argument("--frames", type=int, default=None, help="video frames per sequence (10; 100 with --real-size)")
    p.add_argument("--sequences", type=int, default=None,
                   help=f"sequences (1; 4 with --real-size, the last held out), at most {len(SEQUENCES)}")
    p.add_argument("--real-size", action="store_true",
                   help="default strides and training schedules, a held-out sequence: e2e_real_size_gpu.json")
    p.add_argument("--stages", default="synth," + ",".join(STAGE_NAMES))
    p.add_argument("--meshhead-steps", type=int, default=None, help="600; the profile's ceiling with --real-size")
    p.add_argument("--gaussianhead-steps", type=int, default=None, help="2000; the profile's with --real-size")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="stage-6 steps per rasteriser in the comparison (40; 0: no comparison, the default with "
                        "--real-size)")
    p.add_argument("--detector", choices=("ground_truth", "dlib"), default="ground_truth", help="stage 4's landmarks")
    p.add_argument("--texture", choices=("procedural", "astronaut"), default=None,
                   help="the head's texture: astronaut (a face photograph; the default with --real-size or "
                        "--detector dlib) or procedural (the default otherwise); a non-default one is named in the "
                        "results file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further setting for every stage (recorded with the overrides of the first call, and "
                        "with each stage attempt)")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds from the start after which a running stage is stopped (SIGTERM) and this "
                        "call ends; the next call with the same --home resumes it from its checkpoint")
    args = p.parse_args(argv)
    real = args.real_size
    frames = args.frames or (100 if real else 10)
    n_seq = args.sequences or (4 if real else 1)
    if not 1 <= n_seq <= len(SEQUENCES):
        p.error(f"--sequences must be 1..{len(SEQUENCES)}")
    sequences = SEQUENCES[:n_seq]
    try:
        texture = capture_texture(args.home, args.texture, real, args.detector)
    except ValueError as e:
        p.error(str(e))
    if args.detector == "dlib" and texture != "astronaut":
        p.error("--detector dlib needs --texture astronaut: dlib finds no face on the procedural texture")
    base = REAL_SIZE_OVERRIDES if real else OVERRIDES
    if args.detector == "dlib":  # stage 4 on dlib's detections
        base = [o for o in base if not o.startswith("landmarks.detector=")] + ["landmarks.detector=dlib"]
    held_out = [f'{s}.holdout_sequences=["{sequences[-1]}"]' for s in ("meshhead", "gaussianhead")] \
        if real and n_seq > 1 else []
    overrides = [*base, *held_out, *args.set]
    name = results_name(real, args.detector, texture)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    t_start = time.monotonic()
    args.home.mkdir(parents=True, exist_ok=True)
    results_path = args.home / name
    results = json.loads(results_path.read_text()) if results_path.exists() else {
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "capture": {"cameras": 16, "video": "2200x3208", "frames": frames, "sequences": list(sequences),
                    "heldout_sequence": sequences[-1] if held_out else None, "crop": "2600 -> 2048"},
        "overrides": overrides, "stages": {}, "attempts": {}}
    steps = {"meshhead": [], "gaussianhead": []}
    for stage, n in (("meshhead", args.meshhead_steps or (None if real else 600)),
                     ("gaussianhead", args.gaussianhead_steps or (None if real else 2000))):
        if n is not None:
            steps[stage] = [f"{stage}.steps={n}"]
    results["steps"] = {k: v[0].split("=")[1] if v else "profile" for k, v in steps.items()}
    compare_steps = args.compare_steps if args.compare_steps is not None else (0 if real else 40)

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    s3 = EmbeddedS3(args.home / "s3").start()
    try:
        env = {**os.environ, **s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": "e2e"}
        os.environ.update(env)
        store = ObjectStore(load_config().storage)
        for stage in args.stages.split(","):
            if stage == "synth":
                t0 = time.monotonic()
                cmd = [sys.executable, "-m", "headavatar.cli", "synth", "--capture", CAPTURE,
                       "--frames", str(frames), "--texture", texture]
                for seq in sequences:
                    cmd += ["--sequence", seq]
                subprocess.run(cmd, env=env, check=True)
                (args.home / TEXTURE_MARKER).write_text(texture)
                results["capture"]["texture"] = texture
                results["stages"]["synth"] = {"wall_s": round(time.monotonic() - t0, 1)}
            elif stage == "compare":  # also run before the main stage 6 when "gaussianhead" is asked for
                results["rasterizer_comparison"] = compare_rasterizers(env, store, compare_steps, overrides)
            else:
                if stage == "gaussianhead" and "compare" not in args.stages and compare_steps:
                    results["rasterizer_comparison"] = compare_rasterizers(env, store, compare_steps, overrides)
                attempts = results.setdefault("attempts", {}).setdefault(stage, [])
                attempts.append({"state": "starting", "set": args.set})  # this call's own --set
                save()
                try:
                    run_stage(env, stage, steps.get(stage, []), overrides, attempt=attempts[-1], save=save,
                              deadline=t_start + args.deadline)
                except Deadline:
                    log.warning("%s stopped at the deadline; the next call resumes it", stage)
                    results["stages"][stage] = {**summed(attempts), "unfinished": True}
                    if stage in ("meshhead", "gaussianhead"):
                        results["stages"][stage].update(so_far(store, stage))
                    save()
                    break
                out = summed(attempts)
                out["metrics"] = read_manifest(store, CAPTURE, stage).metrics
                if stage in ("meshhead", "gaussianhead"):
                    history = json.loads(store.get_bytes(store.key(stage_prefix(CAPTURE, stage), "history.json")))
                    out["holdout_curve"] = history["holdout"]
                    out["plateau"] = history["plateau"]
                results["stages"][stage] = out
                if stage == "matting":
                    out["frames_per_s"] = round(out["metrics"].get("images", 0) / out["wall_s"], 2)
                if stage == "extract":  # all cores: the stage's CPU seconds over the frames it decoded
                    decoded = out["metrics"].get("video_frames_decoded", 0)
                    out["cpu_ms_per_decoded_frame"] = round(1000 * out["metrics"]["cpu_s"] / max(decoded, 1), 2)
            save()
            log.info("%s: %s", stage, json.dumps(results["stages"].get(stage))[:400])
        store.close()
    finally:
        s3.stop()
    stamp(results, "headavatar.bench.e2e_gpu", argv)
    save()  # the home copy carries its provenance too
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


def compare_rasterizers(env: dict[str, str], store: ObjectStore, n: int, overrides: list[str]) -> dict:
    """Stage 6 on the same inputs with each rasteriser for ``n`` steps: training steps/s and memory.
    Each run replaces stage 6's outputs; the main run that follows replaces them again."""
    out = {}
    for name in ("torch", "gsplat"):
        r = run_stage(env, "gaussianhead", [f"gaussianhead.steps={n}", f"gaussianhead.rasterizer={name}",
                                            "gaussianhead.eval_every=0"], overrides)
        m = read_manifest(store, CAPTURE, "gaussianhead").metrics
        out[name] = {"train_steps_per_s": round(m["train_steps_per_s"], 3),
                     "ms_per_step": round(1000 / m["train_steps_per_s"], 1), "peak_gpu_mib": r["peak_gpu_mib"]}
        log.info("stage 6 with %s: %s", name, out[name])
    return out


if __name__ == "__main__":
    sys.exit(main())
