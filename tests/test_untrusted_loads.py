"""No code from data (issue 34): checkpoints, models and arrays from the bucket load as plain data only.

A pickle carrying a payload (an object whose ``__reduce__`` would create a marker file) is planted
where a stage loads a checkpoint or a model; the load is refused with one line naming the key, the
payload never runs, and a well-formed checkpoint still round-trips with everything resume needs.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, fake_manifest, tiny_config
from headavatar.contract.outputs import OutputWriter
from headavatar.contract.stage import StageContext, read_manifest
from headavatar.errors import RefusedObject
from headavatar.imaging import npy_array, npz_arrays, npz_bytes
from headavatar.layout import stage_prefix
from headavatar.stages.gaussianhead import load_meshhead
from headavatar.storage import ObjectStore
from headavatar.training.checkpoints import Checkpoints, load_plain
from headavatar.training.loop import Trainer

pytestmark = pytest.mark.s3
CAPTURE = "018"


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def evil_checkpoint(marker: Path, kind: str) -> bytes:
    """What an attacker with write access to the bucket would plant: a checkpoint-looking dict with a payload."""
    state = {"evil": Payload(marker), "step": 100, "cache_key": "x", "model": {"w": torch.zeros(2)}, "config": {},
             "n_exp": 1, "head": {}, "sr": {}}
    if kind == "raw":  # a bare pickle (torch.load's legacy path); protocol 2, the opcodes torch's loader reads
        return pickle.dumps(state, protocol=2)
    buf = io.BytesIO()  # torch.save's zip format
    torch.save(state, buf)
    return buf.getvalue()


def assert_payload_is_live(tmp_path: Path, kind: str) -> None:
    """The planted bytes do run code when loaded the old way: the marker test below means something."""
    control = tmp_path / f"control-{kind}"
    data = evil_checkpoint(control, kind)
    if kind == "raw":
        pickle.loads(data)
    else:
        torch.load(io.BytesIO(data), weights_only=False)
    assert control.exists()


def error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_a_planted_mesh_model_is_refused_and_its_payload_never_runs(store: ObjectStore, tmp_path: Path,
                                                                    kind: str) -> None:
    assert_payload_is_live(tmp_path, kind)
    marker = tmp_path / "pwned"
    fake_manifest(store, "meshhead", {"model.pt": evil_checkpoint(marker, kind)})
    ctx = StageContext("gaussianhead", CAPTURE, tiny_config(), store, tmp_path,
                       {"meshhead": read_manifest(store, CAPTURE, "meshhead")}, {},
                       OutputWriter(store, store.key(stage_prefix(CAPTURE, "gaussianhead"))))
    with pytest.raises(RefusedObject) as e:
        load_meshhead(ctx)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    key = store.key(stage_prefix(CAPTURE, "meshhead"), "model.pt")
    assert msg.startswith(f"{store.uri(key)}: refused to load"), msg
    assert "a pickle that calls exec" in msg and "weights_only" not in msg  # not torch's advice: it is the hole
    assert not marker.exists()


def test_a_planted_training_checkpoint_fails_the_stage_with_one_line(store: ObjectStore, s3_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """The real ``headavatar run gaussianhead`` (a retried task would resume from this key): exit 2, no manifest."""
    marker = tmp_path / "pwned"
    for stage in ("sample", "matting", "fitting"):
        fake_manifest(store, stage, {})
    fake_manifest(store, "meshhead", {"model.pt": b"unused"})
    key = store.key(stage_prefix(CAPTURE, "gaussianhead"), "_state/checkpoint.pt")
    store.put_bytes(key, evil_checkpoint(marker, "zip"))
    r = cli("run", "gaussianhead", "--capture", CAPTURE, "--profile", "demo", env=s3_env, timeout=120)
    line = error_line(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    assert line.startswith(f"error: {store.uri(key)}: refused to load"), line
    assert "--force" in line, line
    assert not marker.exists()
    assert read_manifest(store, CAPTURE, "gaussianhead") is None


def test_a_planted_avatar_fails_render_with_one_line(store: ObjectStore, s3_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for stage in ("sample", "matting", "fitting", "meshhead"):
        fake_manifest(store, stage, {})
    fake_manifest(store, "gaussianhead", {"avatar/avatar.pt": evil_checkpoint(marker, "raw")})
    r = cli("render", "--capture", CAPTURE, "--profile", "demo", "--out", str(tmp_path / "out"), env=s3_env,
            timeout=120)
    line = error_line(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    key = store.key(stage_prefix(CAPTURE, "gaussianhead"), "avatar/avatar.pt")
    assert line.startswith(f"error: {store.uri(key)}: refused to load"), line
    assert not marker.exists()


class TinyTrainer(Trainer):
    name = "tiny"

    def __init__(self, seed: int):
        super().__init__(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def step_loss(self):
        x = torch.randn(8, 3, generator=self.gen)
        loss = self.net(x).pow(2).mean()
        return loss, {"loss": loss.detach()}

    def evaluate(self) -> dict[str, float]:
        return {"holdout": np.float64(0.5)}  # a numpy scalar, as metrics code may return


def test_checkpoints_round_trip_weights_only_with_everything_resume_needs(store: ObjectStore,
                                                                          tmp_path: Path) -> None:
    def attempt() -> StageContext:
        return StageContext("meshhead", CAPTURE, tiny_config(), store, tmp_path, {}, {"sample": "abc"},
                            OutputWriter(store, store.key(stage_prefix(CAPTURE, "meshhead"))), config_digest="c")

    ctx = attempt()
    t = TinyTrainer(0)
    for _ in range(3):
        loss, _ = t.step_loss()
        t.opt.zero_grad()
        loss.backward()
        t.opt.step()
    t.state.step, t.state.history, t.state.evals = 3, [{"step": 3, "loss": 0.25}], [{"step": 0, **t.evaluate()}]
    checkpoints = Checkpoints(ctx, keep_every=3)
    checkpoints.save(t.state_dict())
    raw = store.get_bytes(checkpoints.key)
    plain = torch.load(io.BytesIO(raw), weights_only=True)  # what any reader of the bucket can do safely
    assert type(plain["evals"][0]["holdout"]) is float and plain["published"][0]["step"] == 3

    u = TinyTrainer(1)
    resumed = attempt()
    u.load_state_dict(Checkpoints(resumed).load())
    assert list(resumed.outputs.entries) == ["checkpoints/step-00000003.pt"]  # the published copy still listed
    assert u.state.step == 3 and u.state.history == t.state.history and u.state.evals == [{"step": 0, "holdout": 0.5}]
    assert torch.equal(u.gen.get_state(), t.gen.get_state())  # the sampler continues with the very same draws
    for a, b in zip(u.net.state_dict().values(), t.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert u.opt.state_dict()["state"][0]["exp_avg"].equal(t.opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(u.step_loss()[0], t.step_loss()[0])

    # What weights_only could not read back is refused when saving, not discovered at resume.
    @dataclass
    class Opaque:
        x: int = 1

    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]: .*Opaque cannot be loaded with weights_only"):
        checkpoints.save({**t.state_dict(), "extra": Opaque()})
    with pytest.raises(TypeError, match="ndarray"):
        checkpoints.save({**t.state_dict(), "extra": np.zeros(2)})


@pytest.mark.parametrize("data,why", [(b"", "EOFError"), (b"not a checkpoint", ""), (b"PK\x03\x04junk", ""),
                                      ("list", "a list, not a dict"),
                                      (pickle.dumps([1, 2], protocol=2), "magic number")])
def test_corrupt_or_foreign_files_are_refused_in_one_line(data: bytes | str, why: str) -> None:
    if data == "list":
        buf = io.BytesIO()
        torch.save([1, 2], buf)
        data = buf.getvalue()
    with pytest.raises(RefusedObject) as e:
        load_plain(data, "s3://b/k.pt", "rerun it")
    msg = str(e.value)
    assert msg.startswith("s3://b/k.pt: refused to load") and msg.endswith("; rerun it") and "\n" not in msg, msg
    assert why in msg


def test_planted_arrays_are_refused_in_one_line_and_their_payload_never_runs(store: ObjectStore,
                                                                               tmp_path: Path) -> None:
    """Cameras, fitted parameters, landmarks and vertices (.npz/.npy) from the bucket load as plain arrays only."""
    control, marker = tmp_path / "control", tmp_path / "pwned"

    def evil(path: Path, kind: str) -> bytes:
        buf = io.BytesIO()
        objects = np.array([Payload(path)], dtype=object)  # the same payload as an array's element
        if kind == "npz":
            np.savez(buf, intrinsic=objects, extrinsic=np.eye(4))
        else:
            np.save(buf, objects, allow_pickle=True)
        return buf.getvalue()

    for kind, load in (("npz", lambda data, src: npz_arrays(data, src, ("intrinsic", "extrinsic"))),
                       ("npy", npy_array)):
        data = evil(control, kind)
        loaded = np.load(io.BytesIO(data), allow_pickle=True)  # the payload is live: loaded the unsafe way it runs
        _ = loaded["intrinsic"] if kind == "npz" else loaded
        assert control.exists()
        control.unlink()
        key = store.key(stage_prefix(CAPTURE, "sample"), f"cameras/frame_000000/camera_x.{kind}")
        store.put_bytes(key, evil(marker, kind))
        with pytest.raises(RefusedObject) as e:
            load(store.get_bytes(key), store.uri(key))
        msg = str(e.value)
        assert msg.startswith(f"{store.uri(key)}: refused to load: not plain arrays"), msg
        assert "an object array" in msg, msg
        assert "\n" not in msg and "allow_pickle" not in msg, msg  # not numpy's advice: it is the hole
        assert not marker.exists()
    # Corrupt bytes, an array missing from an archive, and an archive where one array belongs are refused too.
    for data, load, why in ((b"PK\x03\x04junk", npz_arrays, "not plain arrays"),
                            (npz_bytes(intrinsic=np.eye(3)), lambda d, s: npz_arrays(d, s, ("extrinsic",)),
                             "no array 'extrinsic'"),
                            (npz_bytes(v=np.eye(3)), npy_array, "an .npz archive")):
        with pytest.raises(RefusedObject, match=why):
            load(data, "s3://b/k")
    plain = npz_arrays(npz_bytes(intrinsic=np.eye(3), extrinsic=np.eye(4)), "s3://b/k", ("intrinsic",))
    assert plain["extrinsic"].shape == (4, 4)


def test_stage_code_loads_arrays_only_through_the_plain_loaders() -> None:
    """No stage reads .npz/.npy with np.load directly: every array from the bucket goes through the checks above."""
    root = Path(__file__).resolve().parents[1] / "tasks" / "headavatar"
    direct = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.name != "imaging.py"
              for n, line in enumerate(p.read_text().splitlines(), 1) if "np.load(" in line]
    assert direct == [], direct
