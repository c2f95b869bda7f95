"""``headavatar``: the one command every container, pod and local subprocess runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from headavatar import __version__
from headavatar.capture_id import validate_capture_id
from headavatar.errors import ConfigError, PipelineError, RawCaptureError
from headavatar.settings import PipelineConfig, load_config
from headavatar.stages import STAGE_NAMES

if TYPE_CHECKING:  # the CLI imports storage (boto3) only in the commands that use it
    from headavatar.storage import ObjectStore

log = logging.getLogger("headavatar")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="config overlay from config/profiles/<name>.yaml (e.g. demo)")
    p.add_argument("--config", action="append", type=Path, default=[], help="extra YAML overlay file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set extract.frame_stride=3")


def _result_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result-file", type=Path,
                        help="also write the result (the JSON line printed last) to this file: what the Airflow "
                             "task returns, read from the file, as the output may end with other lines")


def _report(result: dict, result_file: Path | None) -> None:
    """Print the command's result as its last stdout line, and write it to ``--result-file`` first."""
    if result_file is not None:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result))
    print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headavatar", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one pipeline stage for a capture")
    run.add_argument("stage", choices=STAGE_NAMES)
    run.add_argument("--capture", required=True, help="capture id, e.g. 018")
    run.add_argument("--force", action="store_true", help="recompute even on a cache hit")
    run.add_argument("--force-run", default="", metavar="RUN_ID",
                     help="recompute once for this orchestrator run: what its earlier attempts made (a checkpoint, "
                          "the result) counts, so its retries resume (the DAG passes its run id)")
    _result_file_arg(run)
    _config_args(run)

    synth = sub.add_parser("synth", help="write a synthetic NeRSemble capture with ground truth")
    synth.add_argument("--capture", required=True)
    synth.add_argument("--out", type=Path, help="local folder to write the raw layout into instead of S3")
    synth.add_argument("--width", type=int, default=2200)
    synth.add_argument("--height", type=int, default=3208)
    synth.add_argument("--frames", type=int, default=90)
    synth.add_argument("--sequence", dest="sequences", action="append", help="sequence name (repeatable)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--noise", type=float, default=2.0, help="sensor noise std in 8-bit levels (0 = clean CG)")
    synth.add_argument("--workers", type=int, default=0)
    synth.add_argument("--texture", choices=("procedural", "astronaut"), default="procedural",
                       help="head texture: procedural (default) or astronaut (a real face photo, for real detectors)")
    synth.add_argument("--layout", choices=("v1", "v2"), default="v1",
                       help="raw layout: v1 (NeRSemble archives) or v2 (nersemble-data download, colour-calibrated)")
    _config_args(synth)

    val = sub.add_parser("validate", help="check that a raw capture is complete and readable: every video opened "
                                          "(codec, frames, size, first frame, tail) and every plate decoded")
    val.add_argument("--capture", required=True)
    _config_args(val)

    status = sub.add_parser("status", help="show which stages of a capture are done, stale or missing, and the "
                                           "earlier results kept as variants (use the config the runs used: "
                                           "--profile/--set)")
    status.add_argument("--capture", required=True)
    _config_args(status)

    sub.add_parser("stages", help="list the stages in pipeline order")

    cfg = sub.add_parser("config", help="configuration: 'config show' prints the effective settings as YAML")
    cfg.add_argument("action", choices=("show",))
    cfg.add_argument("--section", help="only this section, e.g. meshhead")
    _config_args(cfg)

    costs = sub.add_parser("costs", help="measured cost of a capture per stage (wall/CPU/GPU s, memory, disk, "
                                         "bytes stored), from its manifests")
    costs.add_argument("--capture", required=True)
    costs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _config_args(costs)

    cmp = sub.add_parser("compare", help="held-out metrics of trained avatars, from the MLflow server")
    cmp.add_argument("--capture", action="append", help="capture id (repeatable); default: every capture")
    cmp.add_argument("--stage", choices=("gaussianhead", "meshhead"), default="gaussianhead")
    cmp.add_argument("--out", type=Path, help="folder to write compare.csv, compare.html and the avatars' videos into")
    cmp.add_argument("--mlflow", action="store_true",
                     help="also log the report (table, CSV, HTML) to the MLflow experiment as a run of kind 'compare'")
    cmp.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                     help="MLflow server (default: $MLFLOW_TRACKING_URI)")

    rnd = sub.add_parser("render", help="videos of a capture's trained avatar: re-enactment (GT | avatar) from a "
                                        "held-out camera and a turntable, H.264 mp4")
    rnd.add_argument("--capture", required=True)
    rnd.add_argument("--out", type=Path, required=True, help="folder to write reenactment.mp4 and turntable.mp4 into")
    _config_args(rnd)

    exp = sub.add_parser("export", help="a capture's trained avatar in a standard format")
    exp_sub = exp.add_subparsers(dest="format", required=True)
    ply = exp_sub.add_parser("ply", help="its Gaussians at a frame as a 3DGS .ply (splat viewers): positions, "
                                         "f_dc from the coarse RGB, opacity logit, log-scales, quaternion")
    ply.add_argument("--capture", required=True)
    which = ply.add_mutually_exclusive_group()
    which.add_argument("--frame", help="frame folder, e.g. 0012 (default: the first trained frame)")
    which.add_argument("--sequence", help="every frame of this sequence, one <frame>.ply each into --out")
    ply.add_argument("--out", type=Path, required=True, help="the .ply file (--frame), or a folder (--sequence)")
    _config_args(ply)
    web = exp_sub.add_parser("web", help="an animated avatar page (one self-contained .html: the per-frame "
                                           "Gaussians of a sequence, quantised, played by gsplat.js beside the "
                                           "ground truth)")
    web.add_argument("--capture", required=True)
    web.add_argument("--sequence", help="the sequence to play (default: the held-out one, else the first)")
    web.add_argument("--fps", type=float, default=10.0, help="frames per second of the playback")
    web.add_argument("--out", type=Path, required=True, help="the .html file")
    _config_args(web)
    bench = exp_sub.add_parser("benchmark", help="a NeRSemble novel-view benchmark submission: every frame of a "
                                                 "sequence from the 3 hold-out cameras, whole frames at 1100x1604, "
                                                 "H.264 crf 14, zipped as {participant}/{sequence}/cam_{serial}.mp4")
    bench.add_argument("--captures", nargs="+", required=True, metavar="ID[:SEQUENCE]",
                       help="benchmark participants (388 renders its scored sequence GLASSES) or id:sequence")
    bench.add_argument("--out", type=Path, required=True, help="the submission .zip")
    bench.add_argument("--evaluate", action="store_true",
                       help="also score it against the captures' synthetic ground truth (docs/benchmark.md)")
    _config_args(bench)

    unpack = sub.add_parser("unpack", help="unpack the .zip archives under raw/ into the raw layout (S3 to S3)")
    unpack.add_argument("--workers", type=int, default=4, help="members unpacked in parallel")
    _result_file_arg(unpack)
    _config_args(unpack)

    caps = sub.add_parser("captures", help="list the complete raw captures in the bucket (ids, as JSON): every "
                                           "camera present and the upload finished (marker or quiet window)")
    caps.add_argument("--pending", action="store_true",
                      help="only those without a finished avatar of their raw inputs as they are now, each with "
                           "its run id ingest__<id>__<raw digest> and why")
    _config_args(caps)

    assets = sub.add_parser("assets", help="model files a real run needs: list, put (checked) into the bucket, get")
    assets.add_argument("action", choices=("list", "put", "get"))
    assets.add_argument("name", nargs="?", help="asset name (see: headavatar assets list)")
    assets.add_argument("source", nargs="?", help="put: a local path or an http(s) URL")
    assets.add_argument("--to", type=Path, help="get: folder to download into (e.g. $TORCH_HOME/hub/checkpoints)")
    _config_args(assets)
    return parser


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.profile, args.overrides, args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from headavatar.contract.stage import run_stage
    from headavatar.stages import build_stage
    from headavatar.storage import ObjectStore
    from headavatar.tracking import track_stage

    capture = validate_capture_id(args.capture)
    config = _config(args)
    store = ObjectStore(config.storage)
    try:
        result = run_stage(build_stage(args.stage), capture, config, store, force=args.force, force_run=args.force_run)
        tracked = track_stage(result, store, config)
    finally:
        store.close()
    out = {"stage": result.stage, "capture": result.capture, "cached": result.cached,
           "manifest": result.manifest_uri, "files": len(result.manifest.files),
           "wall_time_s": result.manifest.wall_time_s}
    if tracked is not None:
        out["mlflow"] = {"experiment_id": tracked.experiment_id, "run_id": tracked.run_id,
                         "model_version": tracked.model_version}
    _report(out, args.result_file)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from headavatar.compare import as_table, collect, write_reports

    if not args.tracking_uri:
        raise ConfigError("compare needs the MLflow server: --tracking-uri or MLFLOW_TRACKING_URI")
    captures = [validate_capture_id(c) for c in args.capture or []]
    rows = collect(args.tracking_uri, captures or None, args.stage)
    if not rows:
        raise PipelineError(f"no tracked {args.stage} run for {', '.join(captures) or 'any capture'} "
                            f"at {args.tracking_uri}")
    print(as_table(rows))
    title = f"{args.stage}: {', '.join(captures) or 'all captures'}"
    if args.out:
        from headavatar.compare import fetch_videos

        for path in write_reports(rows, args.out, title, fetch_videos(args.tracking_uri, rows, args.out)):
            print(path, file=sys.stderr)
    if args.mlflow:
        from headavatar.compare import log_report

        print(f"logged to MLflow run {log_report(args.tracking_uri, rows, title, args.stage)}", file=sys.stderr)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from headavatar.render_avatar import render_capture
    from headavatar.storage import ObjectStore

    capture = validate_capture_id(args.capture)
    config = _config(args)
    store = ObjectStore(config.storage)
    try:
        print(json.dumps(render_capture(store, capture, config, args.out)))
    finally:
        store.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from headavatar.export_benchmark import export_benchmark
    from headavatar.export_ply import export_ply
    from headavatar.export_web import export_web
    from headavatar.nvs_submission import Request
    from headavatar.storage import ObjectStore

    if args.format == "benchmark":
        requests = [Request.parse(c) for c in args.captures]
    else:
        capture = validate_capture_id(args.capture)
    config = _config(args)
    store = ObjectStore(config.storage)
    try:
        if args.format == "benchmark":
            print(json.dumps(export_benchmark(store, requests, config, args.out, args.evaluate)))
        elif args.format == "web":
            print(json.dumps(export_web(store, capture, config, args.out, args.sequence, args.fps)))
        else:
            print(json.dumps(export_ply(store, capture, config, args.out, args.frame, args.sequence)))
    finally:
        store.close()
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import tempfile

    from headavatar.layout import GROUND_TRUTH, RAW
    from headavatar.storage import ObjectStore
    from headavatar.synthetic.capture import SyntheticSpec, write_capture
    from headavatar.upload import mark_complete

    capture = validate_capture_id(args.capture)
    config = _config(args)
    try:
        spec = SyntheticSpec(capture, width=args.width, height=args.height, frames=args.frames,
                             sequences=tuple(args.sequences or ("EXP-1-head",)),
                             cameras=config.capture.cameras, seed=args.seed, noise=args.noise, layout=args.layout,
                             texture=args.texture)
    except ValueError as e:
        raise PipelineError(f"synth: {e}") from None
    if args.out:
        write_capture(spec, args.out / RAW, args.workers)
        print(args.out / RAW)
        return 0
    store = ObjectStore(config.storage)
    try:
        store.ensure_bucket()
        with tempfile.TemporaryDirectory(prefix="headavatar-synth-") as tmp:
            write_capture(spec, Path(tmp) / RAW, args.workers)
            n = len(store.upload_tree(Path(tmp) / RAW, store.key(RAW)))
            n += len(store.upload_tree(Path(tmp) / GROUND_TRUTH, store.key(GROUND_TRUTH)))
        log.info("upload finished: %s", mark_complete(store, capture, args.layout))  # last, as users are told to
    finally:
        store.close()
    log.info("uploaded %d objects for capture %s", n, capture)
    print(store.uri(store.key(RAW)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from headavatar.storage import ObjectStore

    config = _config(args)
    store = ObjectStore(config.storage)
    try:
        return _validate(store, args.capture, config)
    finally:
        store.close()


def _validate(store: ObjectStore, capture: str, config: PipelineConfig) -> int:
    import time

    from headavatar.raw import discover
    from headavatar.raw_media import check_media

    raw = discover(store, capture, config)
    t0 = time.perf_counter()
    problems = check_media(store, raw, config.storage.max_concurrency)  # every video opened, every plate decoded
    checked = {"videos": sum(len(s.videos) for s in raw.sequences), "plates": len(raw.backgrounds),
               "seconds": round(time.perf_counter() - t0, 2)}
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return RawCaptureError.exit_code
    from headavatar.assets import lacking

    missing = lacking(store, config)  # before any stage runs: the model files this configured run cannot find
    for m in missing:
        print(f"warning: the configured run lacks asset {m['asset']}: {m['why']}", file=sys.stderr)
    print(json.dumps({"capture": raw.capture, "layout": raw.layout, "color_calibration": raw.color_matrices is not None,
                      "cameras": len(raw.cameras), "sequences": [s.label for s in raw.sequences],
                      "digest": raw.digest(), "media_checked": checked,
                      "assets_lacking": [m["asset"] for m in missing]}))
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    """List the model files with their state, put one into the bucket (checked), or get one from it."""
    import tempfile

    from headavatar.assets import CATALOG, asset_state, get_asset, put_asset
    from headavatar.storage import ObjectStore

    config = _config(args)
    store = ObjectStore(config.storage)
    try:
        if args.action == "list":
            rows = [{**asset_state(store, s), "needed": s.needed(config), "setting": s.setting, "what": s.what,
                     "obtain": s.obtain} for s in CATALOG.values()]
            for r in rows:
                state = "verified" if r["verified"] else "present, unverified" if r["present"] else "missing"
                need = "needed" if r["needed"] else "not used by this config"
                print(f"{r['asset']:18s} {state:20s} {need:24s} {r['uri']}", file=sys.stderr)
            print(json.dumps(rows))
            return 0
        if args.name not in CATALOG:
            raise ConfigError(f"unknown asset {args.name!r}; one of {', '.join(CATALOG)}")
        if args.action == "put":
            if not args.source:
                raise ConfigError("assets put needs NAME and SOURCE (a local path or an http(s) URL)")
            store.ensure_bucket()
            with tempfile.TemporaryDirectory(prefix="headavatar-asset-") as tmp:
                print(json.dumps(put_asset(store, CATALOG[args.name], args.source, Path(tmp))))
            return 0
        if not args.to:
            raise ConfigError("assets get needs --to FOLDER")
        print(get_asset(store, CATALOG[args.name], args.to))
        return 0
    finally:
        store.close()


def cmd_status(args: argparse.Namespace) -> int:
    from headavatar.contract.status import capture_status
    from headavatar.stages import build_stage
    from headavatar.storage import ObjectStore

    capture = validate_capture_id(args.capture)
    config = _config(args)
    stages = {}
    for name in STAGE_NAMES:  # the CPU image cannot load the GPU stages' code: those show "unknown"
        try:
            stages[name] = build_stage(name)
        except ImportError as e:
            stages[name] = e
    store = ObjectStore(config.storage)
    try:
        for st in capture_status(stages, capture, config, store):
            print("\n".join(st.lines()))
    finally:
        store.close()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    data = _config(args).model_dump(mode="json")
    if args.section:
        if args.section not in data:
            raise ConfigError(f"config show: unknown section {args.section!r} (one of {', '.join(data)})")
        data = {args.section: data[args.section]}
    print(yaml.safe_dump(data, sort_keys=False, width=120), end="")
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    from headavatar.costs import as_table, capture_costs
    from headavatar.storage import ObjectStore

    capture = validate_capture_id(args.capture)
    store = ObjectStore(_config(args).storage)
    try:
        rows = capture_costs(store, capture, list(STAGE_NAMES))
    finally:
        store.close()
    if not rows:
        raise PipelineError(f"no finished stage for capture {capture} (no manifest under avatars/{capture}/)")
    print(json.dumps(rows) if args.json else as_table(rows))
    return 0


def cmd_captures(args: argparse.Namespace) -> int:
    from headavatar.ingest import as_json, pending_captures, raw_captures
    from headavatar.storage import ObjectStore

    config = _config(args)
    store = ObjectStore(config.storage)
    try:
        print(json.dumps(as_json(pending_captures(store, config)) if args.pending else raw_captures(store, config)))
    finally:
        store.close()
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from headavatar.archives import unpack_all
    from headavatar.storage import ObjectStore

    store = ObjectStore(_config(args).storage)
    try:
        result = unpack_all(store, args.workers)
    finally:
        store.close()
    _report(result, args.result_file)
    if result["failed"]:
        raise PipelineError(f"{len(result['failed'])} archive(s) could not be unpacked; first: {result['failed'][0]}")
    return 0


def _terminate(signum: int, _frame: object) -> None:
    # Containers and pods stop with SIGTERM: unwind so scratch space is removed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("boto3").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    commands = {"run": cmd_run, "synth": cmd_synth, "validate": cmd_validate, "status": cmd_status,
                "captures": cmd_captures, "compare": cmd_compare, "unpack": cmd_unpack, "assets": cmd_assets,
                "config": cmd_config, "costs": cmd_costs, "render": cmd_render, "export": cmd_export,
                "stages": lambda _a: print("\n".join(STAGE_NAMES)) or 0}
    try:
        return commands[args.command](args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
