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

``register`` (after stage 6, in the default ``--stages``): what the pipeline's stage processes do after their
manifests, tracking into MLflow, ending with stage 6's avatar registered as a model version. A real
``mlflow server`` (SQLite in ``--home``, artifacts proxied into the bench's bucket) is started in the background
as soon as mlflow can be imported (a later call of the machine may install it, ``--mlflow-site``), then each
stage's cache-hit ``headavatar run`` tracks it, timed; the model version is read back with ``MlflowClient``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO

from headavatar.bench.provenance import stamp
from headavatar.contract.outputs import state_key
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.errors import MissingObject, RefusedObject
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import NOISE_DEVICE_ENV
from headavatar.tracking import model_name
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


PROGRESS = re.compile(r": step (\d+)/(\d+) ")  # the training loop's progress line (training.loop)
GSPLAT_BUILT = re.compile(r"gsplat: CUDA extension has been set up successfully in ([\d.]+) seconds")
RESUMED = re.compile(r"resuming from the checkpoint at step (\d+)")


class StageLog:
    """A stage's output, line by line: echoed, written to ``path`` with the seconds since the attempt's start
    in front, and the training progress lines kept as ``[seconds, step]`` (the log's timeline of the run)."""

    def __init__(self, stream: IO[str], path: Path | None, t0: float):
        self.stream, self.path, self.t0 = stream, path, t0
        self.progress: list[list[float]] = []
        self.gsplat_build_s: float | None = None
        self.resumed_from: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        out = self.path.open("a") if self.path is not None else None
        try:
            for line in self.stream:
                t = round(time.monotonic() - self.t0, 2)
                sys.stdout.write(line)
                sys.stdout.flush()
                if out is not None:
                    out.write(f"[{t:9.2f}] {line}")
                    out.flush()
                if m := PROGRESS.search(line):
                    self.progress.append([t, int(m.group(1))])
                elif m := GSPLAT_BUILT.search(line):
                    self.gsplat_build_s = float(m.group(1))
                elif m := RESUMED.search(line):
                    self.resumed_from = int(m.group(1))
        finally:
            if out is not None:
                out.close()

    def join(self) -> None:
        self._thread.join(30)


def run_stage(env: dict[str, str], stage: str, extra: list[str], overrides: list[str] = OVERRIDES,
              force: bool = False, attempt: dict | None = None, save: Callable[[], None] = lambda: None,
              deadline: float = float("inf"), checkpoint: Callable[[], str | None] | None = None,
              grace: float = 0.0, log_dir: Path | None = None, command: list[str] | None = None,
              stop: Callable[[], bool] = lambda: False, so_far: Callable[[], dict] | None = None,
              so_far_every: float = 120.0) -> dict:
    """One ``headavatar run`` of ``stage``, measured. ``attempt`` (a dict already in the results) is
    updated every 10 s with the wall seconds so far and ``save`` is called, so an attempt cut short by a
    lost call is still counted. Past ``deadline`` (monotonic), or once ``stop()`` says so, the stage gets
    SIGTERM and ``Deadline`` is raised; with ``checkpoint`` (the stage's resumable checkpoint, as a tag that
    changes whenever it is written) the SIGTERM waits, up to ``grace`` seconds, for the next checkpoint, so
    a resumed attempt loses no steps. The stage's output goes to ``log_dir``/<stage>.log with timestamps;
    its progress lines are kept in the attempt, and every ``so_far_every`` seconds, if the checkpoint changed,
    ``so_far()`` (the checkpoint's step and held-out curve) as ``checkpoint``, so that a run lost with its
    machine still has its curve. ``command`` replaces the stage's CLI (tests)."""
    args = command or [sys.executable, "-m", "headavatar.cli", "run", stage, "--capture", CAPTURE]
    for o in [] if command else [*overrides, *extra]:
        args += ["--set", o]
    if force and not command:
        args.append("--force")
    attempt = {} if attempt is None else attempt
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    output = StageLog(proc.stdout, log_dir / f"{stage}.log" if log_dir else None, t0)
    past: float | None = None  # when the deadline passed (or the stop came)
    at_deadline: str | None = None  # the checkpoint's tag then

    def record(state: str) -> None:
        attempt.update(wall_s=round(time.monotonic() - t0, 1), peak_gpu_mib=round(peak.gpu_mib),
                       peak_host_mib=round(peak.host_mib), state=state)
        if output.progress:
            attempt["progress"] = output.progress
        if output.gsplat_build_s is not None:
            attempt["gsplat_build_s"] = output.gsplat_build_s
        if output.resumed_from is not None:
            attempt["resumed_from"] = output.resumed_from
        save()

    with PeakMonitor(proc.pid) as peak:
        recorded = looked = t0
        seen: str | None = None  # the checkpoint's tag when so_far() last read it
        while (rc := _wait(proc, 1.0)) is None:
            now = time.monotonic()
            if so_far is not None and checkpoint is not None and now - looked >= so_far_every:
                looked = now
                if (tag := _tag(checkpoint)) not in (seen, None, "unknown"):
                    seen, attempt["checkpoint"] = tag, so_far()
            if past is None and (now > deadline or stop()):
                past = now
                if checkpoint is not None and grace > 0:
                    at_deadline = _tag(checkpoint)
                    log.info("%s: past the deadline, stopping at its next checkpoint (at most %.0f s)", stage, grace)
            if past is None:
                if now - recorded >= 10:
                    recorded = now
                    record("running")
                continue
            if checkpoint is not None and now <= past + grace and _tag(checkpoint) == at_deadline:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            output.join()
            record("stopped at the deadline")
            raise Deadline(stage)
    output.join()
    record("done" if rc == 0 else f"exit code {rc}")
    if rc != 0:
        raise SystemExit(f"stage {stage} failed with exit code {rc}")
    return {k: attempt[k] for k in ("wall_s", "peak_gpu_mib", "peak_host_mib")}


def etag(store: ObjectStore, key: str) -> str | None:
    """The object's ETag (it changes whenever the object is written), None while there is none."""
    info = store.head(key)
    return info.etag if info is not None else None


def _tag(checkpoint: Callable[[], str | None]) -> str | None:
    try:
        return checkpoint()
    except Exception as e:  # a failed look is not a new checkpoint
        log.warning("could not look at the checkpoint: %s", e)
        return "unknown"


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


# Progress-line stretches a training stage's timeline is cut into: every 5% of the default ceiling; the
# window capacity planning reads (bench.capacity.stage6_step).
STRETCH = {"meshhead": (1000, (5000, 10_000)), "gaussianhead": (5000, (10_000, 15_000))}
GSPLAT_MARKER = "gsplat_prebuild.json"  # in --home: the prebuild's result, written when it ends
GSPLAT_PID = "gsplat_prebuild.pid"
BUILD_GSPLAT = """
import json, os, sys, time
t0, out = time.monotonic(), {}
try:
    from gsplat.cuda._backend import _C
    out["rc"] = 0 if _C is not None else 1
    if _C is None:
        out["error"] = "gsplat found no CUDA toolkit"
except BaseException as e:
    out.update(rc=1, error=repr(e)[:500])
out["wall_s"] = round(time.monotonic() - t0, 1)
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(out, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


def cuda_arch_list() -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` as PyTorch's extension builder works it out on this machine's first GPU
    (its capability, "+PTX"), read through NVML so no CUDA context is made; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:
        return None
    return f"{major}.{minor}+PTX"


def prebuild_gsplat(home: Path, env: dict[str, str], log_dir: Path | None) -> subprocess.Popen | None:
    """Build gsplat's CUDA extension (a minute of nvcc) in a process of its own session, which outlives this
    call, while the stages before stage 6 run: stage 6 then finds it built. Nothing when gsplat is not
    installed or a build was already started from this ``home``. The builder sees no GPU (no CUDA context
    in the GPU memory measured meanwhile): ``env`` must name the GPU architecture (``TORCH_CUDA_ARCH_LIST``,
    the same for stage 6, so stage 6's build step finds nothing to redo)."""
    import importlib.util

    importlib.invalidate_caches()  # a folder on sys.path may have been made (and gsplat put there) since
    if (home / GSPLAT_PID).exists() or importlib.util.find_spec("gsplat") is None:
        return None
    log_path = (log_dir or home) / "gsplat_prebuild.log"
    with log_path.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-c", BUILD_GSPLAT, str(home / GSPLAT_MARKER)],
                                env={**env, "CUDA_VISIBLE_DEVICES": ""}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (home / GSPLAT_PID).write_text(str(proc.pid))
    log.info("building gsplat's CUDA extension in the background (pid %d, %s)", proc.pid, log_path)
    return proc


class GsplatPrebuild:
    """gsplat's extension built in the background as soon as gsplat is installed: at once, or when a later
    call of the machine installs it (into a folder already on ``sys.path``), looked for every 5 s."""

    def __init__(self, home: Path, env: dict[str, str], log_dir: Path | None, period: float = 5.0):
        self.home, self.env, self.log_dir, self.period = home, env, log_dir, period
        self.proc: subprocess.Popen | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set() and not (self.home / GSPLAT_PID).exists():
            self.proc = prebuild_gsplat(self.home, self.env, self.log_dir)
            if self.proc is None:
                self._done.wait(self.period)

    def result(self, install_wait: float, stop: Callable[[], bool] = lambda: False) -> dict | None:
        """For stage 6: wait up to ``install_wait`` seconds for gsplat to be installed, then for its build; the
        build's result (None when gsplat never came: stage 6 then runs without it)."""
        t0 = time.monotonic()
        while not (self.home / GSPLAT_PID).exists() and time.monotonic() - t0 < install_wait and not stop():
            time.sleep(0.5)
        self._done.set()
        self._thread.join()
        if (out := wait_gsplat(self.home, self.proc)) is None:
            log.warning("gsplat was not installed within %.0f s: stage 6 runs without it", install_wait)
            return None
        return {**out, "waited_s": round(time.monotonic() - t0, 1)}


def wait_gsplat(home: Path, proc: subprocess.Popen | None, timeout: float = 900.0) -> dict | None:
    """The prebuild's result once it has ended (None when none was started from this ``home``), with the
    seconds waited for it here."""
    marker, pid_file = home / GSPLAT_MARKER, home / GSPLAT_PID
    if not pid_file.exists():
        return None
    t0 = time.monotonic()
    while not marker.exists() and time.monotonic() - t0 < timeout:
        alive = proc.poll() is None if proc is not None else _running(int(pid_file.read_text()))
        if not alive:
            break
        time.sleep(0.5)
    info = json.loads(marker.read_text()) if marker.exists() else {"rc": None, "error": "ended without a result"}
    return {**info, "waited_s": round(time.monotonic() - t0, 1)}


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (not ended, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def from_the_log(attempts: list[dict], stretch: int = 5000, window: tuple[int, int] = (10_000, 15_000)) -> dict:
    """A training stage's timeline from its attempts' progress lines (``[seconds since the attempt's start,
    step]``): each attempt's seconds from its start to its first step (its first progress line less the
    steps before that line at the rate of the next stretch of lines), the first attempt's as
    ``stage_start_to_step_1_s``; ms a step between consecutive lines at multiples of ``stretch`` within an
    attempt (evaluations and checkpoints included), ``window``'s also under its own keys."""
    out: dict = {"source": "the stage's progress lines, timed by the bench as they were printed"}
    starts, stretches = [], []
    for a in attempts:
        prog = [(t, int(s)) for t, s in a.get("progress", [])]
        if len(prog) >= 2:
            (t1, s1), (t2, s2) = prog[0], prog[1]
            starts.append(round(t1 - (s1 - a.get("resumed_from", 0) - 1) * (t2 - t1) / max(s2 - s1, 1), 2))
        marks = [(t, s) for t, s in prog if s % stretch == 0]
        stretches += [[s1, s2, round(t2 - t1, 2), round(1000 * (t2 - t1) / (s2 - s1), 2)]
                      for (t1, s1), (t2, s2) in itertools.pairwise(marks)]
    if starts:
        out["stage_start_to_step_1_s"] = starts[0]
        out["attempt_start_to_first_step_s"] = starts
    out["stretches"] = stretches  # [from step, to step, seconds, ms a step]
    lo, hi = window
    for s1, s2, seconds, ms in stretches:
        if (s1, s2) == (lo, hi):
            out[f"seconds_steps_{lo}_to_{hi}"], out[f"ms_per_step_{lo}_to_{hi}"] = seconds, ms
            break
    return out


def timeline(stage: str, attempts: list[dict]) -> dict:
    """:func:`from_the_log` of a training stage; stage 6's also says how long its first attempt spent building
    gsplat's extension (0 when it was built ahead), the part of its start-up the CUDA image does ahead."""
    out = from_the_log(attempts, *STRETCH[stage])
    if stage == "gaussianhead":
        out["gsplat_extension_build_s"] = attempts[0].get("gsplat_build_s", 0.0)
    return out


def capture_texture(home: Path, asked: str | None, real: bool, detector: str) -> str:
    """The head texture of this ``--home``'s capture: the one ``synth`` recorded there (a later call that
    asks for another would mix two captures in one results file), else ``asked``, else the default."""
    marker = home / TEXTURE_MARKER
    made = marker.read_text().strip() if marker.exists() else None
    texture = asked or made or default_texture(real, detector)
    if made and texture != made:
        raise ValueError(f"{home} holds a capture with the {made} texture, not {texture}: use another --home")
    return texture


MLFLOW_SITE_ENV = "E2E_MLFLOW_SITE"  # benchmarks/e2e_gpu.sh: where a later call installs mlflow (not on the path)
TRACKED = re.compile(r"^\[\s*([\d.]+)\] .*(?:: cache hit|tracked in MLflow run|MLflow tracking at )")
READ_BACK = """
import json, sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
client, name = MlflowClient(sys.argv[1]), sys.argv[2]
exp = client.get_experiment_by_name("headavatar")
try:
    champion = client.get_model_version_by_alias(name, "champion").version
except MlflowException:  # no version with a held-out score
    champion = None
runs = client.search_runs([exp.experiment_id], "tags.`headavatar.kind` = 'stage'") if exp else []
print(json.dumps({
    "versions": [{"version": v.version, "status": v.status, "run_id": v.run_id, "created_ms": v.creation_timestamp,
                  "source": v.source, "holdout_psnr": v.tags.get("holdout_psnr")}
                 for v in client.search_model_versions(f"name = '{name}'")],
    "champion": champion,
    "tracked_stages": sorted(r.data.tags["headavatar.stage"] for r in runs if "headavatar.manifest" in r.data.tags)}))
"""


def mlflow_path(site: str | None, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``site`` (the folder mlflow was installed into) first on PYTHONPATH: the server's and the
    tracking processes'. The stages themselves run without it, as they did before it came."""
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)} if site else env


def mlflow_installed(site: str | None) -> bool:
    """Whether mlflow can be imported: from ``site`` once its install has finished (benchmarks/e2e_gpu.sh
    writes ``.installed`` last), else from this interpreter."""
    if site:
        return any((Path(d) / ".installed").exists() and (Path(d) / "mlflow").is_dir() for d in site.split(os.pathsep))
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


class TrackingServer:
    """A real ``mlflow server`` (its start is 15-30 s of imports), started in the background as soon as mlflow can
    be imported (looked for every ``period`` seconds), so that it is up when stage 6 ends: SQLite in ``home``,
    artifacts proxied into ``s3://<bucket>/mlflow`` as in infra/compose."""

    def __init__(self, home: Path, env: dict[str, str], bucket: str, site: str | None, period: float = 5.0):
        from headavatar.devserver.mlflow_server import EmbeddedMLflow

        self.site, self.period = site, period
        # its environment over os.environ's: the bench's S3 identity and endpoint, mlflow's folder on the path
        self.server = EmbeddedMLflow(home / "mlflow", mlflow_path(site, env), bucket)
        self.info: dict = {}
        self._give_up = threading.Event()
        self._thread = threading.Thread(target=self._start, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        t0 = time.monotonic()
        while not mlflow_installed(self.site):
            if self._give_up.wait(self.period):
                return
        t1 = time.monotonic()
        try:
            self.server.start()
            self.info.update(pid=self.server.proc.pid, start_s=round(time.monotonic() - t1, 1))
            log.info("mlflow server up at %s (pid %d) in %.1f s", self.server.uri, self.server.proc.pid,
                     time.monotonic() - t1)
        except Exception as e:
            self.info["error"] = f"{type(e).__name__}: {e}"[:500]
            log.warning("mlflow server did not start: %s", self.info["error"])
        self.info["installed_after_s"] = round(t1 - t0, 1)

    def uri(self, wait: float, stop: Callable[[], bool] = lambda: False) -> str | None:
        """The server's URI, waiting up to ``wait`` seconds for mlflow to be installed (then for its start);
        None when it never came or did not start."""
        t0 = time.monotonic()
        while not mlflow_installed(self.site) and time.monotonic() - t0 < wait and not stop():
            time.sleep(0.5)
        if mlflow_installed(self.site):
            self._thread.join()  # its start (the thread keeps looking otherwise, until stop())
        self.info["waited_s"] = round(time.monotonic() - t0, 1)
        return self.server.uri if "pid" in self.info else None

    def stop(self) -> None:
        self._give_up.set()
        self.server.stop()


def track(server: TrackingServer, env: dict[str, str], stages: list[str], extra: dict[str, list[str]],
          overrides: list[str], log_dir: Path, out: dict, wait: float = 0.0, save: Callable[[], None] = lambda: None,
          command: Callable[[str], list[str]] | None = None, cache_hit_s: float = 300.0, during: str | None = None
          ) -> str | None:
    """Track ``stages`` into MLflow as the pipeline's stage processes do after their manifests: each stage's
    cache-hit ``headavatar run`` (``command(stage)`` in tests) with ``MLFLOW_TRACKING_URI`` set, in pipeline
    order, one already done in ``out["stages"]`` skipped. Per stage: the process's wall seconds and, from its log,
    the seconds from its cache hit to the end of its tracking (``during``: what else ran meanwhile). A stage whose
    run is not over within ``cache_hit_s`` (no cache hit: it would be computed again) is stopped and the tracking
    ends there. Returns the server's URI, None when there is none or a stage failed."""
    uri = server.uri(wait)
    out["server"] = dict(server.info)
    if uri is None:
        out["skipped"] = out["server"].get("error", f"mlflow was not installed within {wait:.0f} s")
        return None
    out.pop("skipped", None)
    tracking_env = {**mlflow_path(server.site, env), "MLFLOW_TRACKING_URI": uri}
    log_dir = log_dir / "register"
    log_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if out.setdefault("stages", {}).get(stage, {}).get("state") == "done":
            continue
        record = out["stages"][stage] = {"during": during} if during else {}
        path = log_dir / f"{stage}.log"
        offset = path.stat().st_size if path.exists() else 0
        try:  # a cache hit takes seconds; one that does not come would recompute the stage: stopped
            run_stage(tracking_env, stage, extra.get(stage, []), overrides, attempt=record, save=save,
                      log_dir=log_dir, command=command(stage) if command else None,
                      deadline=time.monotonic() + cache_hit_s)
        except (Deadline, SystemExit) as e:
            record["error"] = f"{type(e).__name__}: {e}"
            return None
        lines = path.read_text()[offset:].splitlines()
        marks = [float(m.group(1)) for line in lines if (m := TRACKED.match(line))]
        if len(marks) >= 2:
            record["tracking_s"] = round(marks[-1] - marks[0], 2)  # cache hit -> tracked
        record["outcome"] = next((t for t in ("registered as model", "tracked in MLflow run", "already tracked",
                                              "MLflow tracking at") for line in lines if t in line), "no tracking")
    return uri


def register(server: TrackingServer, env: dict[str, str], stages: list[str], extra: dict[str, list[str]],
             overrides: list[str], log_dir: Path, wait: float = 0.0, started_at: float | None = None,
             save: Callable[[], None] = lambda: None, out: dict | None = None,
             command: Callable[[str], list[str]] | None = None, cache_hit_s: float = 300.0) -> dict:
    """:func:`track` every finished stage not tracked yet, so that stage 6's ends with its avatar registered as a
    model version; then the model's versions read back with ``MlflowClient``. ``started_at`` (epoch seconds: the
    capture's start) gives the time from the capture's start to the registered version. The server is stopped
    at the end."""
    out = {} if out is None else out
    t0 = time.monotonic()
    try:
        uri = track(server, env, stages, extra, overrides, log_dir, out, wait, save, command, cache_hit_s)
        if uri is None:
            return out
        name = model_name(CAPTURE)
        r = subprocess.run([sys.executable, "-c", READ_BACK, uri, name], env={**mlflow_path(server.site, env)},
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            out["read_back_error"] = r.stderr[-500:]
            return out
        back = json.loads(r.stdout.strip().splitlines()[-1])
        versions = sorted(back["versions"], key=lambda v: int(v["version"]))
        out.update(model=name, versions=versions, champion=back["champion"], tracked_stages=back["tracked_stages"])
        if versions:
            out["model_version"] = versions[-1]["version"]
            if started_at is not None:
                out["capture_start_to_registered_version_s"] = round(versions[-1]["created_ms"] / 1000 - started_at, 1)
        return out
    finally:
        server.stop()
        out["wall_s"] = round(time.monotonic() - t0, 1)
        save()


def finished(results: dict, stages: tuple[str, ...]) -> list[str]:
    """Those of ``stages`` this run has finished (their manifests written), in pipeline order."""
    return [s for s in stages if s in results["stages"] and not results["stages"][s].get("unfinished")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--home", type=Path, default=Path("/tmp/headavatar-e2e"))
    p.add_argument("--frames", type=int, default=None, help="video frames per sequence (10; 100 with --real-size)")
    p.add_argument("--sequences", type=int, default=None,
                   help=f"sequences (1; 4 with --real-size, the last held out), at most {len(SEQUENCES)}")
    p.add_argument("--real-size", action="store_true",
                   help="default strides and training schedules, a held-out sequence: e2e_real_size_gpu.json")
    p.add_argument("--stages", default="synth," + ",".join(STAGE_NAMES) + ",register")
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
    p.add_argument("--deadline-grace", type=float, default=0.0,
                   help="past --deadline, wait up to this many seconds for a training stage's next checkpoint "
                        "before stopping it, so that the next call loses no steps")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="where each stage's output goes, timestamped (<home>/logs)")
    p.add_argument("--prebuild-gsplat", action="store_true",
                   help="build gsplat's CUDA extension in the background while the stages before stage 6 run, "
                        "as soon as gsplat is installed (once per --home; stage 6 waits for the build)")
    p.add_argument("--gsplat-wait", type=float, default=0.0,
                   help="with --prebuild-gsplat: seconds stage 6 waits for gsplat to be installed (by a later "
                        "call of the machine, into a folder already on PYTHONPATH) before it starts without")
    p.add_argument("--synth-noise-device", default=None, metavar="DEVICE",
                   help="draw the capture's sensor noise with PyTorch on DEVICE (cuda: the CPUs only render and "
                        "encode); numpy's generator otherwise, as the tests' captures")
    p.add_argument("--mlflow-wait", type=float, default=0.0,
                   help="register: seconds to wait for mlflow to be installed (by a later call of the machine) before "
                        "the phase is skipped")
    p.add_argument("--mlflow-site", default=os.environ.get(MLFLOW_SITE_ENV) or None,
                   help="register: the folder mlflow is (or will be) installed into, put on the path of the server and "
                        f"the tracking processes only (${MLFLOW_SITE_ENV}; else this interpreter's own mlflow)")
    p.add_argument("--track-during-stage6", action="store_true",
                   help="register: track stages 1 to 5 while stage 6 trains (as soon as the server is up), so that "
                        "only stage 6's tracking comes after it; the pipeline tracks each stage before the next")
    p.add_argument("--stop-file", type=Path, default=None,
                   help="once this file exists, the bench does what it does at --deadline: a bench left running "
                        "in the background over several calls is stopped by the last one")
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

    log_dir = args.log_dir or args.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp(results, "headavatar.bench.e2e_gpu", argv)  # again at the end; a call cut short still has it

    def save() -> None:
        """The results in ``--home`` and ``--out`` (a call cut short still leaves them where it returns files)."""
        text = json.dumps(results, indent=1)
        results_path.write_text(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(text)

    s3 = EmbeddedS3(args.home / "s3").start()
    tracker: TrackingServer | None = None
    early: threading.Thread | None = None  # --track-during-stage6
    early_out: dict = {}
    try:
        env = {**os.environ, **s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": "e2e"}
        if args.prebuild_gsplat and "TORCH_CUDA_ARCH_LIST" not in env and (arch := cuda_arch_list()):
            env["TORCH_CUDA_ARCH_LIST"] = arch  # the builder's and stage 6's alike
        os.environ.update(env)
        store = ObjectStore(load_config().storage)
        stop = (lambda: args.stop_file.exists()) if args.stop_file else (lambda: False)
        deadline = t_start + args.deadline
        gsplat = GsplatPrebuild(args.home, env, log_dir) if args.prebuild_gsplat and "TORCH_CUDA_ARCH_LIST" in env \
            else None
        tracker = TrackingServer(args.home, env, BUCKET, args.mlflow_site) if "register" in args.stages.split(",") \
            else None
        for stage in args.stages.split(","):
            # register is seconds (stage 6 done, its server up): a stop file made after stage 6 does not skip it
            if stage != "register" and (time.monotonic() >= deadline or stop()):
                log.warning("no time left for %s: the next call runs it", stage)
                break
            if stage == "synth":
                t0 = time.monotonic()
                results["capture_started_at"] = time.time()  # epoch seconds: the register phase's reference
                cmd = [sys.executable, "-m", "headavatar.cli", "synth", "--capture", CAPTURE,
                       "--frames", str(frames), "--texture", texture]
                for seq in sequences:
                    cmd += ["--sequence", seq]
                noise_env = {NOISE_DEVICE_ENV: args.synth_noise_device} if args.synth_noise_device else {}
                synth = subprocess.Popen(cmd, env={**env, **noise_env}, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
                output = StageLog(synth.stdout, log_dir / "synth.log", t0)
                if synth.wait():
                    raise SystemExit(f"synth failed with exit code {synth.returncode}")
                output.join()
                (args.home / TEXTURE_MARKER).write_text(texture)
                results["capture"]["texture"] = texture
                results["capture"]["noise"] = f"torch on {args.synth_noise_device}" if noise_env else "numpy"
                results["stages"]["synth"] = {"wall_s": round(time.monotonic() - t0, 1), "workers": os.cpu_count()}
            elif stage == "register":
                done = finished(results, STAGE_NAMES)
                out = results.setdefault("register", {})
                if early is not None:  # stages 1-5 tracked while stage 6 trained: their records
                    early.join(600)
                    out.setdefault("stages", {}).update({k: v for k, v in early_out.get("stages", {}).items()
                                                         if not early.is_alive()})
                began = results.get("capture_started_at")
                if began is not None and (six := read_manifest(store, CAPTURE, "gaussianhead")) is not None:
                    out["capture_start_to_stage6_manifest_s"] = round(
                        datetime.fromisoformat(six.finished_at).timestamp() - began, 1)
                register(tracker, env, done, steps, overrides, log_dir, wait=args.mlflow_wait, started_at=began,
                         save=save, out=out)
            elif stage == "compare":  # also run before the main stage 6 when "gaussianhead" is asked for
                results["rasterizer_comparison"] = compare_rasterizers(env, store, compare_steps, overrides)
            else:
                if stage == "gaussianhead" and "compare" not in args.stages and compare_steps:
                    results["rasterizer_comparison"] = compare_rasterizers(env, store, compare_steps, overrides)
                if stage == "gaussianhead" and gsplat is not None:
                    built = gsplat.result(args.gsplat_wait, lambda: stop() or time.monotonic() >= deadline)
                    results.setdefault("gsplat_prebuild", built)  # the call that waited for it
                    log.info("gsplat's extension: %s", built)
                if stage == "gaussianhead" and tracker is not None and args.track_during_stage6:
                    before = finished(results, STAGE_NAMES[:STAGE_NAMES.index(stage)])
                    early = threading.Thread(target=track, args=(tracker, env, before, steps, overrides, log_dir,
                                                                 early_out), kwargs={"during": "stage 6"}, daemon=True)
                    early.start()
                attempts = results.setdefault("attempts", {}).setdefault(stage, [])
                attempts.append({"state": "starting", "set": args.set})  # this call's own --set
                save()
                training = stage in ("meshhead", "gaussianhead")
                ckpt = state_key(store.key(stage_prefix(CAPTURE, stage)), RESUMABLE) if training else None
                try:
                    run_stage(env, stage, steps.get(stage, []), overrides, attempt=attempts[-1], save=save,
                              deadline=deadline, grace=args.deadline_grace, log_dir=log_dir, stop=stop,
                              checkpoint=(lambda k=ckpt: etag(store, k)) if training else None,
                              so_far=(lambda st=stage: so_far(store, st)) if training else None)
                except Deadline:
                    log.warning("%s stopped at the deadline; the next call resumes it", stage)
                    results["stages"][stage] = {**summed(attempts), "unfinished": True}
                    if training:
                        results["stages"][stage].update(so_far(store, stage))
                        results["stages"][stage]["from_the_log"] = timeline(stage, attempts)
                    save()
                    break
                out = summed(attempts)
                out["metrics"] = read_manifest(store, CAPTURE, stage).metrics
                if training:
                    history = json.loads(store.get_bytes(store.key(stage_prefix(CAPTURE, stage), "history.json")))
                    out["holdout_curve"] = history["holdout"]
                    out["plateau"] = history["plateau"]
                    out["from_the_log"] = timeline(stage, attempts)
                results["stages"][stage] = out
                if stage == "matting":
                    out["frames_per_s"] = round(out["metrics"].get("images", 0) / out["wall_s"], 2)
                if stage == "extract":  # all cores: the stage's CPU seconds over the frames it decoded
                    decoded = out["metrics"].get("video_frames_decoded", 0)
                    out["cpu_ms_per_decoded_frame"] = round(1000 * out["metrics"]["cpu_s"] / max(decoded, 1), 2)
            save()
            log.info("%s: %s", stage, json.dumps(results["stages"].get(stage, results.get(stage)))[:400])
        store.close()
    finally:
        if tracker is not None:
            tracker.stop()
        s3.stop()
    stamp(results, "headavatar.bench.e2e_gpu", argv)
    save()
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
