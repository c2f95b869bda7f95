"""Stage 1's resource bounds on a real capture in real S3: scratch holds a bounded window of videos,
not the whole capture; the first bad video stops every camera worker at once."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import av
import pytest

from conftest import TINY, cli, tiny_config, upload_capture
from headavatar.contract.stage import SCRATCH_ENV, run_stage
from headavatar.layout import RAW, stage_prefix
from headavatar.stages import build_stages
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import SyntheticSpec, write_capture

pytestmark = pytest.mark.s3


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):  # deleted between the listing and the stat
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class ScratchSampler(threading.Thread):
    """The largest size of a directory tree seen, sampled every millisecond or so."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.samples = root, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _tree_bytes(self.root))
            self.samples += 1
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


@pytest.mark.slow
def test_scratch_holds_a_bounded_window_of_videos(store: ObjectStore, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """3 sequences x 16 cameras; 2 workers + 1 video ahead: at most 3 videos (and plates) on scratch."""
    spec = SyntheticSpec("105", frames=12, sequences=("EXP-1-head", "EXP-2-eyes", "EXP-3-cheeks+nose"), **TINY)
    write_capture(spec, tmp_path / "cap" / RAW, workers=2)
    upload_capture(store, tmp_path / "cap")
    raw = list(store.list(store.key(RAW)))  # this test's prefix holds capture 105 alone
    videos = [o.size for o in raw if o.key.endswith(".mp4")]
    plates = [o.size for o in raw if o.key.endswith(".jpg")]
    assert len(videos) == 48 and len(plates) == 16
    bound = 3 * (max(videos) + max(plates))
    assert sum(videos) + sum(plates) > 10 * bound  # the capture is far bigger than the bound

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))
    sampler = ScratchSampler(scratch)
    sampler.start()
    try:
        res = run_stage(build_stages()["extract"], "105", tiny_config(
            "extract.frame_stride=3", "sample.frame_stride=2", "extract.workers=2", "extract.prefetch_videos=1"), store)
    finally:
        peak = sampler.stop()
    print(f"scratch peak {peak} B (sampled {sampler.samples} times), bound {bound} B, "
          f"capture {sum(videos) + sum(plates)} B")
    assert sampler.samples > 20
    assert 0 < peak <= bound, f"scratch peaked at {peak} bytes, bound {bound}"
    m = res.manifest.metrics
    assert m["raw_scratch_bound_mb"] == pytest.approx(bound / 2**20, abs=0.01)
    assert 0 < m["raw_scratch_peak_mb"] <= m["raw_scratch_bound_mb"]
    assert m["images_written"] == 16 * 3 * 2  # 12 frames, every 3rd extracted, every 2nd kept: 2 per video


def _corrupt_packet(video: Path, index: int) -> None:
    """Overwrite the NAL length of the ``index``-th packet (decode order): the header stays valid, so the
    video probes fine (for an index past the first frame's packets and before the tail's), and decoding
    fails there (FFmpeg: invalid data)."""
    with av.open(str(video)) as c:
        pos = [p.pos for p in c.demux(c.streams.video[0]) if p.size][index]
    data = bytearray(video.read_bytes())
    data[pos:pos + 4] = b"\xff\xff\xff\xff"
    video.write_bytes(bytes(data))


@pytest.mark.slow
def test_first_bad_video_stops_the_other_workers(store: ObjectStore, tmp_path: Path, s3_env: dict[str, str]) -> None:
    """One broken video (the first job's): exit 2 with one line, and the other cameras' workers are stopped
    instead of decoding and uploading their frames (a full run writes 16 + 16 x 20 x 5 = 1616 objects)."""
    spec = SyntheticSpec("106", frames=40, sequences=("EXP-1-head",), **TINY)
    write_capture(spec, tmp_path / RAW, workers=2)
    first = sorted(spec.cameras)[0]
    # Packet 12: past what the probe decodes (the first frame) and before the tail it reads (the last 8 frames).
    _corrupt_packet(tmp_path / RAW / f"sequence_EXP-1-head_part-1/106/EXP-1-head/cam_{first}.mp4", 12)
    upload_capture(store, tmp_path)
    t0 = time.monotonic()
    r = cli("run", "extract", "--capture", "106", "--profile", "demo", "--set", "extract.frame_stride=1",
            "--set", "sample.frame_stride=2", "--set", "extract.workers=2", env=s3_env)
    seconds = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "BrokenProcessPool" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"cam_{first}.mp4: corrupt video data" in last, last
    written = list(store.list(store.key(stage_prefix("106", "extract"))))
    per_camera = 1 + 20 * 5
    print(f"failing run: {len(written)} objects written in {seconds:.1f} s")
    # At most the bad job and the one running beside it (2 workers): not 15 cameras' worth.
    assert len(written) <= 2 * per_camera, f"{len(written)} objects written by a failing run ({seconds:.1f} s)"
    assert not store.exists(store.key(stage_prefix("106", "extract"), "manifest.json"))
