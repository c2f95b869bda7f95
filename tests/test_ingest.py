"""Ingestion: NeRSemble .zip deliveries unpacked S3 to S3, and only complete captures reported."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import runpy
import shutil
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import cli, tiny_config, upload_capture, zip_capture
from headavatar.layout import RAW
from headavatar.storage import ObjectStore
from headavatar.upload import mark_complete

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

# The ingestion DAG's task code, imported here, before a test starts: importing Airflow sets up its
# logging, which would drop the handler caplog put on the root logger had it been imported in a test.
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402

import headavatar_airflow.ingest as ingest_plugin  # noqa: E402
from headavatar_airflow.execution import ExecutionSettings  # noqa: E402


def upload_archives(store: ObjectStore, folder: Path) -> None:
    for z in sorted(folder.glob("*.zip")):
        store.upload_file(z, store.key(RAW, z.name))


def captures(env: dict[str, str]) -> list[str]:
    r = cli("captures", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.s3
def test_zip_deliveries_unpack_into_the_raw_layout_once(store: ObjectStore, tiny_capture: Path,
                                                       s3_env: dict[str, str], tmp_path: Path) -> None:
    expected = zip_capture(tiny_capture / RAW, "021", tmp_path / "zips")
    upload_archives(store, tmp_path / "zips")
    mark_complete(store, "021", "v1")  # the delivery is whole: marked after its archives
    assert captures(s3_env) == []  # archives only: nothing usable yet

    r = cli("unpack", env=s3_env)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["unpacked"]) == 4 and not result["failed"]
    for rel, sha in expected.items():
        assert hashlib.sha256(store.get_bytes(store.key(RAW, rel))).hexdigest() == sha, rel
    assert captures(s3_env) == ["021"]
    assert cli("validate", "--capture", "021", env=s3_env).returncode == 0

    again = json.loads(cli("unpack", env=s3_env).stdout.strip().splitlines()[-1])
    assert again == {"unpacked": [], "skipped": result["unpacked"], "failed": []}
    assert all(store.exists(store.key(RAW, z.name)) for z in (tmp_path / "zips").glob("*.zip"))  # kept


@pytest.mark.s3
def test_bad_archives_fail_clearly_and_write_nothing(store: ObjectStore, s3_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    evil = tmp_path / "sequence_EXP-1-head_part-1.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("018/EXP-1-head/cam_222200036.mp4", b"video")
        zf.writestr("../../avatars/018/extract/manifest.json", b"{}")
    good = tmp_path / "camera_params.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("030/camera_params.json", b"{}")
    store.upload_file(evil, store.key(RAW, evil.name))
    store.upload_file(good, store.key(RAW, good.name))
    store.put_bytes(store.key(RAW, "truncated.zip"), good.read_bytes()[:40])

    r = cli("unpack", env=s3_env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: 2 archive(s) could not be unpacked"), r.stderr[-2000:]
    assert "unsafe path '../../avatars/018/extract/manifest.json'" in r.stderr
    assert "truncated.zip: not a readable zip archive" in r.stderr
    keys = {o.key[len(store.key()) + 1:] for o in store.list(store.key())}
    assert "raw/camera_params/030/camera_params.json" in keys  # the good archive was still unpacked
    assert not any("EXP-1-head/cam_" in k or k.startswith("avatars/") for k in keys)  # nothing of the bad one
    assert {k for k in keys if "_rejected" in k or k.endswith("zip")} == {  # the bad ones set aside, with why
        "raw/camera_params.zip", *(f"raw/_rejected/{name}{ext}" for name in (evil.name, "truncated.zip")
                                   for ext in ("", ".reason.txt"))}


@pytest.mark.s3
def test_only_complete_captures_are_reported(store: ObjectStore, tiny_capture: Path,
                                             s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    raw = store.key(RAW)
    # 022: a copy of 018 whose upload is still running: one camera of one sequence has not arrived.
    for o in store.list(raw):
        rel = o.key[len(raw) + 1:]
        if "/018/" in rel and not rel.endswith("EXP-2-eyes/cam_222200036.mp4"):
            store.copy(o.key, f"{raw}/{rel.replace('/018/', '/022/')}")
    # 023: camera parameters only.
    store.copy(store.key(RAW, "camera_params/018/camera_params.json"),
               store.key(RAW, "camera_params/023/camera_params.json"))
    r = cli("captures", env=s3_env)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["018"]
    assert "capture 022 not complete yet: sequence sequence_EXP-2-eyes_part-1 of capture 022 has no video " \
           "for camera(s) 222200036" in r.stderr
    assert "capture 023 not complete yet: capture 023: missing background plate" in r.stderr


def _subset(tiny_capture: Path, out: Path, skip: str) -> Path:
    """A copy of the local capture without the files whose path contains ``skip`` (not yet uploaded)."""
    for src in tiny_capture.rglob("*"):
        if src.is_file() and skip not in src.as_posix():
            dst = out / src.relative_to(tiny_capture)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return out


def pending(env: dict[str, str], *sets: str) -> tuple[list[dict[str, str]], str]:
    r = cli("captures", "--pending", "--profile", "demo", *(a for s in sets for a in ("--set", s)), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def raw_digest(env: dict[str, str]) -> str:
    r = cli("validate", "--capture", "018", "--profile", "demo", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["digest"]


@pytest.mark.s3
@pytest.mark.slow
def test_a_half_uploaded_multi_sequence_capture_waits_for_its_marker(store: ObjectStore, tiny_capture: Path,
                                                                     s3_env: dict[str, str], tmp_path: Path) -> None:
    # EXP-1-head is all there, EXP-2-eyes not yet: every visible sequence has all its cameras.
    upload_capture(store, _subset(tiny_capture, tmp_path / "half", "EXP-2-eyes"), complete=False)
    found, log = pending(s3_env)
    assert found == [] and captures(s3_env) == []
    assert "capture 018 not complete yet: upload not finished: no completion marker" in log
    assert "raw/camera_params/018/_COMPLETE to be written after the upload" in log
    # The fallback: an upload that writes no marker counts once nothing changed for ingest.quiet_minutes.
    quiet, log = pending(s3_env, "ingest.quiet_minutes=0")
    assert [p["capture"] for p in quiet] == ["018"] and "no raw object changed for" in log

    upload_capture(store, tiny_capture)  # the rest, then the marker, last
    found, log = pending(s3_env)
    digest = raw_digest(s3_env)
    assert found == [{"capture": "018", "run_id": f"ingest__018__{digest[:12]}", "raw_digest": digest,
                      "reason": "no finished run"}]
    assert "capture 018 complete (completion marker s3://" in log


def _finish(store: ObjectStore) -> None:
    """A finished avatar of what is uploaded now: stages 1-2 for real (they record the raw digest), stages
    3-6 as quick stand-ins with the real stages' names and inputs (training takes minutes), run through
    the real stage contract so their manifests chain like a real run's."""
    from headavatar.contract.stage import Stage, run_stage
    from headavatar.stages import STAGE_NAMES, build_stage

    for name in STAGE_NAMES:
        real = build_stage(name)
        stage = real if name in ("extract", "sample") else type(f"StandIn_{name}", (Stage,), {
            "name": name, "inputs": real.inputs, "config_sections": (), "code_version": real.code_version,
            "run": lambda self, ctx: ctx.outputs.put_bytes("out.txt", ",".join(ctx.inputs.values()).encode()),
        })()
        run_stage(stage, "018", tiny_config(), store)


@pytest.mark.s3
@pytest.mark.slow
def test_a_sequence_added_after_a_finished_run_is_pending_again(store: ObjectStore, tiny_capture: Path,
                                                                s3_env: dict[str, str], tmp_path: Path) -> None:
    upload_capture(store, _subset(tiny_capture, tmp_path / "first", "EXP-2-eyes"))
    first = raw_digest(s3_env)
    _finish(store)
    found, log = pending(s3_env)
    assert found == []  # finished from the raw inputs as they are: not pending, and the log says so
    assert f"capture 018 not pending: its finished avatar is of the raw inputs as they are now (raw digest " \
           f"{first[:12]})" in log

    time.sleep(1.1)  # LastModified has 1 s resolution: the late sequence is strictly newer than the marker
    late = tiny_capture / RAW / "sequence_EXP-2-eyes_part-1"
    store.upload_tree(late, store.key(RAW, late.name))
    found, log = pending(s3_env)
    assert found == [] and "objects changed after its completion marker" in log  # the late upload is under way

    mark_complete(store, "018", "v1")  # ... and now it is done
    found, _ = pending(s3_env)
    second = raw_digest(s3_env)
    assert second != first
    assert found == [{"capture": "018", "run_id": f"ingest__018__{second[:12]}", "raw_digest": second,
                      "reason": "raw inputs changed since its finished run"}]


# --- ingestion that explains itself and heals: the Airflow tasks, run in this process -----------------


def s3_connection(monkeypatch: pytest.MonkeyPatch, s3_env: dict[str, str], endpoint: str | None = None) -> None:
    """The Airflow connection ``headavatar_s3`` the ingestion tasks read, pointing at the test's bucket
    (through ``endpoint`` when given)."""
    monkeypatch.setenv("AIRFLOW_CONN_HEADAVATAR_S3", json.dumps({
        "conn_type": "aws", "login": s3_env["AWS_ACCESS_KEY_ID"], "password": s3_env["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": endpoint or s3_env["HEADAVATAR_S3_ENDPOINT"],
                  "bucket": s3_env["HEADAVATAR_S3_BUCKET"], "prefix": s3_env["HEADAVATAR_S3_PREFIX"],
                  "region_name": "us-east-1"}}))


def run_unpack_task() -> dict[str, Any] | None:
    """The DAG's ``unpack`` task (local backend: the CLI as a subprocess of the worker), one try."""
    op = ingest_plugin.unpack_operator(ExecutionSettings(backend="local"))
    ti = SimpleNamespace(dag_id="headavatar_ingest", task_id="unpack", try_number=1)
    return op.execute({"params": {}, "ti": ti, "run_id": "scheduled__test"})


def corrupt_delivery(store: ObjectStore, tiny_capture: Path, zips: Path) -> tuple[str, bytes]:
    """Capture 021 as archives, the camera parameters' cut in half (its zip directory, at the end, is
    gone), marked complete after them; returns (the broken archive's key, the intact archive)."""
    zip_capture(tiny_capture / RAW, "021", zips)
    upload_archives(store, zips)
    intact = (zips / "camera_params.zip").read_bytes()
    key = store.key(RAW, "camera_params.zip")
    store.put_bytes(key, intact[: len(intact) // 2])
    mark_complete(store, "021", "v1")
    return key, intact


@pytest.mark.s3
def test_a_corrupt_archive_is_set_aside_once_and_a_fixed_one_is_ingested(
        store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    key, intact = corrupt_delivery(store, tiny_capture, tmp_path / "zips")
    s3_connection(monkeypatch, s3_env)
    capfd.readouterr()
    # First run: the task fails for good (exit 2: no retry, so the DAG's failure notifier mails it once) ...
    with pytest.raises(AirflowFailException, match="headavatar unpack exited with 2: error: 1 archive") as failed:
        run_unpack_task()
    aside = store.key(RAW, "_rejected", "camera_params.zip")
    why = f"{store.uri(key)}: not a readable zip archive (File is not a zip file); set aside as {store.uri(aside)}"
    task_log = capfd.readouterr().out  # the operator's log (structlog, printed), the CLI's output in it
    assert f"ERROR headavatar.archives: {why}" in task_log, task_log[-3000:]
    unpack = runpy.run_path(str(REPO / "dags" / "headavatar_ingest.py"))["dag"].get_task("unpack")
    [notifier] = unpack.on_failure_callback
    ti = SimpleNamespace(task_id="unpack", try_number=1, max_tries=unpack.retries, dag_id="headavatar_ingest",
                         log_url="http://airflow/log")
    notifier.render_template_fields({"ti": ti, "run_id": "scheduled__test", "exception": failed.value})
    assert notifier.subject == "[headavatar] ingestion: unpack failed (try 1)" and why in notifier.body
    # ... and the archive is set aside with its reason: no longer where unpack looks.
    assert not store.exists(key) and store.get_bytes(aside) == intact[: len(intact) // 2]
    reason = store.get_bytes(aside + ".reason.txt").decode()
    assert reason.startswith(f"{store.uri(key)}: not a readable zip archive") and "upload a fixed archive" in reason
    others = sorted(store.uri(store.key(RAW, z.name)) for z in (tmp_path / "zips").glob("*.zip")
                    if z.name != "camera_params.zip")

    # Next run: green, the set-aside archive neither tried nor reported again.
    assert run_unpack_task() == {"unpacked": [], "skipped": others, "failed": []}
    task_log = capfd.readouterr().out
    assert "running: headavatar unpack" in task_log and "camera_params" not in task_log, task_log[-3000:]

    # The fixed archive, uploaded under its old name (then the marker, as users do), is ingested.
    store.upload_file(tmp_path / "zips" / "camera_params.zip", key)
    mark_complete(store, "021", "v1")
    r = cli("unpack", env=s3_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["unpacked"] == [store.uri(key)]
    assert captures(s3_env) == ["021"]


class FaultyS3:
    """A reverse proxy in front of the test's SeaweedFS that fails requests with ``fault``: ``SlowDown``
    (503, the store throttling) or ``reset`` (the connection closed without an answer, as by a server
    going away). While ``only_ranged`` (the default) only ranged GETs fail, the reads of an archive's
    bytes, so a command lists and stats its way to the archive first; otherwise every request fails.
    Requests are passed on unchanged, Host included: the SigV4 signature covers it."""

    def __init__(self, upstream: str, fault: str) -> None:
        self.upstream, self.fault, self.only_ranged, self.faults = urlsplit(upstream), fault, True, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def handle_one_request(self) -> None:  # one handler for every method
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline or not self.parse_request():
                    self.close_connection = True
                    return
                proxy.handle(self)
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        if not self.only_ranged or (h.command == "GET" and "Range" in h.headers):
            self.faults += 1
            if self.fault == "reset":
                h.close_connection = True
                return
            error = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>" \
                    b"<Message>Please reduce your request rate.</Message></Error>"
            h.send_response_only(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(error)))
            h.end_headers()
            h.wfile.write(error)
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request(h.command, h.path, body=body,
                         headers={k: v for k, v in h.headers.items() if k.lower() != "expect"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", resp.headers.get("Content-Length", "0") if h.command == "HEAD"
                      else str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def __enter__(self) -> FaultyS3:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.s3
@pytest.mark.parametrize("fault", ["SlowDown", "reset"])
@pytest.mark.slow
def test_s3_faults_during_ingestion_exit_75_and_the_tasks_are_retried(
        fault: str, store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    zip_capture(tiny_capture / RAW, "021", tmp_path / "zips")
    upload_archives(store, tmp_path / "zips")
    mark_complete(store, "021", "v1")
    config = shutil.copytree(REPO / "config", tmp_path / "config")  # 2 attempts per request, not 10: quick
    pipeline = config / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("max_attempts: 10", "max_attempts: 2"))
    monkeypatch.setenv("HEADAVATAR_CONFIG_DIR", str(config))
    caplog.set_level(logging.INFO)
    with FaultyS3(s3_env["HEADAVATAR_S3_ENDPOINT"], fault) as s3:
        s3_connection(monkeypatch, s3_env, endpoint=s3.url)
        with pytest.raises(AirflowException) as unpack:
            run_unpack_task()  # the archives listed, then reading the first one fails: exit 75
        s3.only_ranged = False  # now the whole store is away
        with pytest.raises(AirflowException) as listing:
            ingest_plugin.find_pending_captures.function()
    for failed, command in ((unpack, "unpack"), (listing, "captures --pending")):
        assert not isinstance(failed.value, AirflowFailException), failed.value  # Airflow retries it
        assert str(failed.value).startswith(f"headavatar {command} exited with 75: error: cannot "), failed.value
    assert ("the object store answered SlowDown" if fault == "SlowDown" else "object store unreachable") \
        in str(unpack.value)
    assert s3.faults >= 4  # each request tried twice
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("error: cannot list" in e for e in errors), errors  # the CLI's stderr, in the task's log
    # A transient fault is not the archive's: nothing set aside, nothing marked unpacked.
    assert not list(store.list(store.key(RAW, "_rejected"))) and not list(store.list(store.key("ingest")))

    # The retry, with the store back: ingested as if nothing had happened.
    s3_connection(monkeypatch, s3_env)
    result = run_unpack_task()
    assert result is not None and len(result["unpacked"]) == 4 and not result["failed"], result
    assert captures(s3_env) == ["021"]


@pytest.mark.s3
def test_the_ingestion_task_logs_why_each_capture_is_or_is_not_pending(
        store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    upload_capture(store, tiny_capture)  # 018: complete, never run
    store.copy(store.key(RAW, "camera_params/018/camera_params.json"),  # 023: camera parameters only
               store.key(RAW, "camera_params/023/camera_params.json"))
    store.put_bytes(store.key(RAW, "camera_params/bad..id/camera_params.json"), b"{}")
    s3_connection(monkeypatch, s3_env)
    caplog.set_level(logging.INFO)
    found = ingest_plugin.find_pending_captures.function()
    assert [f["conf"] for f in found] == [{"id": "018"}]
    run_id = found[0]["trigger_run_id"]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "headavatar_airflow.ingest"]
    text = "\n".join(m for _, m in lines)
    # The CLI's stderr, line by line at its own level: one verdict per capture, with its reason.
    assert "capture 023 not complete yet: capture 023: missing background plate" in text
    assert "capture 018 complete (completion marker s3://" in text
    assert f"capture 018 pending: no finished run (run {run_id})" in text
    assert any(level == "WARNING" and "not a valid capture id" in m for level, m in lines), lines
    assert f"1 capture(s) pending; 018: run {run_id}" in text


@pytest.mark.s3
def test_ingestion_tasks_use_their_own_s3_identity(store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HEADAVATAR_INGEST_S3_CONN_ID set (the compose stack: the stages' identity may not write raw/),
    unpack and the pending list sign with ingestion's connection: here the stages' one has a wrong secret."""
    zip_capture(tiny_capture / RAW, "018", tmp_path / "zips")
    upload_archives(store, tmp_path / "zips")
    mark_complete(store, "018", "v1")
    s3_connection(monkeypatch, s3_env)
    monkeypatch.setenv("AIRFLOW_CONN_HEADAVATAR_S3_INGEST", os.environ["AIRFLOW_CONN_HEADAVATAR_S3"])
    monkeypatch.setenv("HEADAVATAR_INGEST_S3_CONN_ID", "headavatar_s3_ingest")
    stages = json.loads(os.environ["AIRFLOW_CONN_HEADAVATAR_S3"])
    monkeypatch.setenv("AIRFLOW_CONN_HEADAVATAR_S3", json.dumps({**stages, "password": "not-the-secret"}))
    unpacked = run_unpack_task()
    assert unpacked is not None and len(unpacked["unpacked"]) == len(list((tmp_path / "zips").glob("*.zip")))
    assert [f["conf"] for f in ingest_plugin.find_pending_captures.function()] == [{"id": "018"}]
    # The run parameters every ingested capture gets (HEADAVATAR_INGEST_PARAMS), its own id last.
    monkeypatch.setenv("HEADAVATAR_INGEST_PARAMS", '{"profile": "demo", "meshhead_steps": 50, "id": "x"}')
    with pytest.raises(AirflowFailException, match=r"^HEADAVATAR_INGEST_PARAMS: 'id' is not a run parameter"):
        ingest_plugin.find_pending_captures.function()
    monkeypatch.setenv("HEADAVATAR_INGEST_PARAMS", '{"profile": "demo", "meshhead_steps": 50}')
    assert [f["conf"] for f in ingest_plugin.find_pending_captures.function()] == [
        {"profile": "demo", "meshhead_steps": 50, "id": "018"}]
    # The stages' settings are untouched by ingestion's.
    settings = ExecutionSettings(backend="local")
    assert (settings.s3_conn_id, settings.for_ingestion().s3_conn_id) == ("headavatar_s3", "headavatar_s3_ingest")


@pytest.mark.parametrize(("raw", "error"), [
    ("profile=demo", "HEADAVATAR_INGEST_PARAMS is not JSON (Expecting value: line 1 column 1 (char 0)): "
                     "'profile=demo'"),
    ('["demo"]', "HEADAVATAR_INGEST_PARAMS must be a JSON object of run parameters, not '[\"demo\"]'"),
    ('{"steps": 5}', "HEADAVATAR_INGEST_PARAMS: 'steps' is not a run parameter (one of profile, sample_stride, "),
    ('{"profile": "../x"}', "HEADAVATAR_INGEST_PARAMS: profile: '../x' does not match "),
    ('{"meshhead_steps": "20"}', "HEADAVATAR_INGEST_PARAMS: meshhead_steps: '20' is not of type 'null', 'integer'"),
])
def test_ingestion_run_parameters_are_checked_against_the_trigger_form(raw: str, error: str) -> None:
    """A wrong HEADAVATAR_INGEST_PARAMS is one line naming it and what is wrong, before any run is triggered."""
    with pytest.raises(ValueError) as refused:
        ingest_plugin.ingest_run_params(raw)
    assert str(refused.value).startswith(error) and "\n" not in str(refused.value), refused.value
    assert ingest_plugin.ingest_run_params("") == ingest_plugin.ingest_run_params("{}") == {}
    assert ingest_plugin.ingest_run_params('{"profile": null, "force": true}') == {"profile": None, "force": True}
