"""The avatar as a 3DGS ``.ply``: read back by plyfile (an independent reader), and rendered from the file
alone as the avatar renders itself (its coarse RGB) at that frame."""

from __future__ import annotations

import json
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import plyfile
import pytest
import torch

from conftest import BUCKET, cli, tiny_config, upload_capture
from headavatar.nvs_scores import score_submission
from headavatar.nvs_submission import HEIGHT, HOLD_OUT_SERIALS, WIDTH, Request, add_video, check_submission, video_name
from headavatar.render.gaussian_raster import Splats, build_gaussian_rasterizer
from headavatar.render_avatar import load_avatar
from headavatar.splat_ply import PROPERTIES, SH_C0
from headavatar.storage import ObjectStore

pytestmark = [pytest.mark.s3, pytest.mark.slow]
STAGES = ("extract", "sample", "matting", "fitting", "meshhead", "gaussianhead")
# The benchmark's split (its 3 hold-out cameras never trained on), short training.
SETTINGS = ["--profile", "ci", "--config", str(Path(__file__).parents[1] / "config" / "benchmark-nvs.yaml"),
            "--set", "meshhead.steps=20", "--set", "gaussianhead.steps=40"]
# Rendered from the file vs the avatar's own coarse render: the same Gaussians through float32 log/exp and
# logit/sigmoid, so only rounding differs (163.4 dB measured, docs/export.md).
MIN_PSNR_DB = 60.0
MIN_GAIN_DB = 3.0  # the benchmark export over an all-black one, inside the head (measured: see the test's print)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-20))


@pytest.fixture(scope="module")
def trained_env(s3, tiny_capture: Path) -> dict[str, str]:
    """A bucket prefix holding capture 018 trained through stage 6 once for this module's tests."""
    env = {**s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": f"t-{secrets.token_hex(4)}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        store = ObjectStore(tiny_config().storage)
        upload_capture(store, tiny_capture)
        store.close()
    for stage in STAGES:
        r = cli("run", stage, "--capture", "018", *SETTINGS, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    return env


@pytest.fixture
def store(trained_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    for k, v in trained_env.items():
        monkeypatch.setenv(k, v)
    st = ObjectStore(tiny_config().storage)
    yield st
    st.close()


def test_the_ply_reads_back_and_renders_as_the_avatar(store: ObjectStore, trained_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "avatar.ply"
    r = cli("export", "ply", "--capture", "018", *SETTINGS, "--frame", "0000", "--out", str(out), env=trained_env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])

    # plyfile reads the layout viewers expect: one vertex element, these float properties, one per Gaussian.
    vertex = plyfile.PlyData.read(str(out))["vertex"]
    assert [p.name for p in vertex.properties] == list(PROPERTIES)
    assert {p.val_dtype for p in vertex.properties} == {"f4"}
    assert vertex.count == result["gaussians"] > 300 and result["bytes"]["0000"] == out.stat().st_size

    # The Gaussians as plyfile gives them, decoded as 3DGS viewers do, rendered at a held-out camera ...
    def col(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(vertex[n], np.float32) for n in names], -1))

    from_file = Splats(col("x", "y", "z"), col("rot_0", "rot_1", "rot_2", "rot_3"),
                       torch.exp(col("scale_0", "scale_1", "scale_2")), torch.sigmoid(col("opacity"))[:, 0],
                       SH_C0 * col("f_dc_0", "f_dc_1", "f_dc_2") + 0.5)
    trainer = load_avatar(store, "018", tiny_config())
    v, cam = trainer.coarse, trainer.held_cams[0]
    view = torch.eye(4)
    view[:3] = v.E[0, cam].float().cpu()
    raster = build_gaussian_rasterizer("torch", torch.device("cpu"))
    image, _ = raster(from_file, view, v.K[0, cam].float().cpu(), v.size, v.size, with_alpha=False)
    # ... equals the avatar's own coarse RGB render of that frame and camera.
    with torch.no_grad():
        own = trainer.rasterize(0, cam)[..., :3].float().cpu()
    psnr = _psnr(image, own)
    print(f"ply render vs the avatar's coarse RGB: {psnr:.1f} dB")
    assert psnr > MIN_PSNR_DB, psnr
    assert float(own.std()) > 0.05  # a head, not an empty frame

    seq = tmp_path / "EXP-1-head"
    r = cli("export", "ply", "--capture", "018", *SETTINGS, "--sequence", "EXP-1-head", "--out", str(seq),
            env=trained_env)
    assert r.returncode == 0, r.stderr[-3000:]
    frames = json.loads(r.stdout.strip().splitlines()[-1])["frames"]
    assert frames and sorted(p.name for p in seq.iterdir()) == sorted(f"{f}.ply" for f in frames)
    bad = cli("export", "ply", "--capture", "018", *SETTINGS, "--frame", "9999", "--out", str(out), env=trained_env)
    assert bad.returncode == 2 and "no frame '9999' in the avatar" in bad.stderr.strip().splitlines()[-1]


def test_the_benchmark_submission_passes_its_check_and_scores_against_the_held_out_truth(
        store: ObjectStore, trained_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "submission.zip"
    r = cli("export", "benchmark", "--captures", "018:EXP-1-head", "--out", str(out), "--evaluate", *SETTINGS,
            env=trained_env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    # Every frame of the sequence (20, of which stage 2 kept every 2nd) from each hold-out camera, 1100x1604.
    names = [video_name(18, "EXP-1-head", s) for s in HOLD_OUT_SERIALS]
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(names)
    assert check_submission(out, dict.fromkeys(names, 20)) == {}
    assert {n: (v["frames"], v["width"], v["height"]) for n, v in result["videos"].items()} == \
        dict.fromkeys(names, (20, WIDTH, HEIGHT))
    assert len(result["benchmark_videos_missing"]) == 15  # none of the 5 benchmark participants was exported

    scores = result["scores"]
    print("benchmark export vs held-out truth:", scores)
    assert scores["protocol"] == "headavatar-nvs-benchmark-matted/1" and scores["frames"] == 60
    # The same scoring of an all-black submission: the head rendered where the truth has it beats it by far.
    black = tmp_path / "black.zip"
    with zipfile.ZipFile(black, "w") as zf:
        for n in names:
            add_video(zf, n, [np.zeros((HEIGHT, WIDTH, 3), np.uint8)] * 20, tmp_path)
    floor = score_submission(store, tiny_config(), black, [Request("018", "EXP-1-head")])
    print("all-black submission:", floor)
    assert scores["nvs_psnr_matte"] > floor["nvs_psnr_matte"] + MIN_GAIN_DB, (scores, floor)
    assert scores["nvs_psnr"] > floor["nvs_psnr"] + MIN_GAIN_DB / 2, (scores, floor)

    bad = cli("export", "benchmark", "--captures", "018:EXP-9-none", "--out", str(out), *SETTINGS, env=trained_env)
    assert bad.returncode == 2 and "no sequence 'EXP-9-none'" in bad.stderr.strip().splitlines()[-1]
    assert check_submission(out, dict.fromkeys(names, 20)) == {}  # the refused export left the earlier zip as it was
