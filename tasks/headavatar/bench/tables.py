"""Markdown tables for the docs, generated from ``benchmarks/results/*.json`` at docs build time.

Numbers are never copied by hand into a page: a page names a results file (``<!-- bench: e2e_gpu -->``)
and ``docs/hooks.py`` puts this module's table there, with the file's commit, date, machine and
command underneath. A results file without a dedicated table gets a generic one (every number in it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def load(name: str, results: Path = RESULTS) -> dict[str, Any]:
    path = results / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"benchmark results file {path} not found")
    return json.loads(path.read_text())


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None or v == "":
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    if isinstance(m, dict):
        parts = [m.get("gpu"), m.get("cpu"), f"{m['cores']} cores" if m.get("cores") else None,
                 f"{m['cpus']} cores" if m.get("cpus") else None, f"torch {m['torch']}" if m.get("torch") else None]
        machine = ", ".join(str(p) for p in parts if p)
    else:
        machine = str(m)
    commit = str(doc.get("commit", "?"))[:10]
    if "dirty" in doc and doc["dirty"] is not False:  # true, or null: a tree without .git
        commit += " (with uncommitted changes)" if doc["dirty"] else " (uncommitted changes unknown)"
    return (f"<small>Measured {str(doc.get('date', '?'))[:10]} at commit `{commit}` on {machine or '?'}; "
            f"`{doc.get('command', '?')}`.</small>")


def extract_sample(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["runs"]:
        rows.append([f"{r['cameras']} cams x {r['frames']} frames, {r['width']}x{r['height']}, noise {r['noise']:g}",
                     f"{r['video_mb']} MB", f"{r['decode_only']['seconds']:.1f} s",
                     f"{r['ours']['seconds']:.1f} s ({r['ours_extract']['seconds']:.1f} + "
                     f"{r['ours_sample']['seconds']:.1f})", f"{r['straightforward']['seconds']:.1f} s",
                     f"{r['speedup_vs_straightforward']:.2f}x", f"{r['ours_over_decode_only']:.2f}",
                     f"{r['ours']['peak_rss_mb']:.0f} MB"])
    return _table(["capture", "video data", "decode only", "ours (extract + sample)", "straightforward",
                   "speed-up", "ours / decode", "peak RSS ours"], rows)


def e2e_gpu(doc: dict[str, Any]) -> str:
    rows = []
    for stage, r in doc["stages"].items():
        m = r.get("metrics", {})
        quality = []
        for key, fmt in (("train_steps_per_s", "{:.2f} steps/s"), ("holdout_psnr", "PSNR {:.1f} dB"),
                         ("holdout_ssim", "SSIM {:.3f}"), ("holdout_iou", "IoU {:.3f}"), ("iou_mean", "IoU {:.3f}"),
                         ("reprojection_error_px_mean", "reprojection {:.2f} px")):
            if key in m:
                quality.append(fmt.format(m[key]))
        gib = (lambda v: f"{v / 1024:.1f} GiB" if v else "")  # noqa: E731
        rows.append([stage, f"{r['wall_s']:.1f} s", gib(r.get("peak_gpu_mib")), gib(r.get("peak_host_mib")),
                     f"{m['bytes'] / 1e6:.1f} MB" if "bytes" in m else "", "; ".join(quality)])
    return _table(["stage", "wall", "peak GPU (device total)", "peak host", "stored", "speed / quality"], rows)


def matting_gpu(doc: dict[str, Any]) -> str:
    rows = [[r["batch"], r["dtype"], r["fps"], r["ms_per_frame"], r["peak_gpu_mem_gib"]] for r in doc["runs"]]
    return (f"{doc.get('model', '')}, {doc.get('size')}² frames.\n\n"
            + _table(["batch", "dtype", "frames/s", "ms/frame", "peak GPU GiB"], rows))


def training_gpu(doc: dict[str, Any]) -> str:
    f, mh = doc["fitting"], doc["meshhead_default_profile"]
    rows = [[f"fitting ({dev})", f"{f[f'fit_seconds_{dev}']:.1f} s", "",
             f"reprojection {f[f'reprojection_px_{dev}']:.2f} px"] for dev in ("cpu", "cuda")]
    rows += [
            ["mesh head step", f"{mh['step_ms']:.0f} ms ({mh['steps_per_s']:.2f} steps/s)",
             f"{mh['peak_gpu_mem_gib']:.1f} GiB",
             f"held-out IoU {mh['holdout_iou_initial']:.3f} -> {mh['holdout_iou_after']:.3f}"]]
    return _table(["what", "time", "peak GPU", "quality"], rows)


def gaussianhead_gpu(doc: dict[str, Any]) -> str:
    rows = [[f"{r['gaussians']:,} Gaussians, {r['size']}², {r['channels']} ch", f"{r['gsplat_fwd_bwd_ms']:.1f} ms",
             f"{r['gsplat_peak_gib']:.2f} GiB", f"{r['torch_fwd_bwd_ms']:.1f} ms", f"{r['torch_peak_gib']:.2f} GiB",
             f"{r['max_abs_image_diff']:.3f}"] for r in doc["rasterizers"]]
    table = _table(["forward + backward", "gsplat", "gsplat memory", "PyTorch", "PyTorch memory",
                    "max image difference"], rows)
    t = doc.get("training")
    if t:
        table += (f"\n\nTraining {t['steps']} steps ({t['seconds']:.0f} s): held-out PSNR "
                  f"{t['before']['holdout_psnr']:.1f} -> {t['after']['holdout_psnr']:.1f} dB, SSIM "
                  f"{t['before']['holdout_ssim']:.3f} -> {t['after']['holdout_ssim']:.3f}.")
    return table


def backends_gpu(doc: dict[str, Any]) -> str:
    out = []
    g = doc.get("gaussian")
    if g:
        def ms(r: dict[str, Any], name: str) -> str:
            v = r.get(f"{name}_image_only_fwd_bwd_ms")
            return "" if v is None else f"{v} ms"

        rows = [[f"{r['gaussians']:,}, {r['size']}²", ms(r, "gsplat"), ms(r, "dgr"), ms(r, "torch")]
                for r in g["rasterizers"]]
        out.append(_table(["Gaussians, image (32 ch), fwd+bwd, image only", "gsplat", "dgr (32 ch)", "PyTorch"],
                          rows))
    m = doc.get("mesh")
    if m:
        rows = [[k.removeprefix("training_"), f"{v['step_ms']:.1f} ms ({v['steps_per_s']:.1f} steps/s)",
                 f"{v['peak_gpu_mem_gib']:.1f} GiB", f"{v['holdout_iou_after']:.3f}"]
                for k, v in m.items() if k.startswith("training_")]
        out.append(_table(["mesh rasteriser", "training step", "peak GPU", "held-out IoU after 300 steps"], rows))
    k = doc.get("knn")
    if k:
        out.append(f"simple-knn scale init on {k['points']:,} points: {k['simple_knn_ms']} ms, at most "
                   f"{100 * k['max_rel_diff_vs_exact']:.2f}% from exact.")
    return "\n\n".join(out)


def landmark_detectors(doc: dict[str, Any]) -> str:
    """Per detector: faces and non-faces found on the photographs, false faces on the procedural head, and
    the photo-textured head (the test fixture) found and its point error."""
    photos, heads = doc["photographs_lfw_subset"], doc["synthetic_head"]
    names = [k for k in photos["roll_0"]]
    rows = []
    for n in names:
        fixture = heads["astronaut"].get(n, {})
        error = (f"{fixture['error_px_mean']} px (NME {fixture['nme_mean']})"
                 if fixture.get("error_px_mean") is not None else "")
        rows.append([f"`{n}`", *(f"{100 * photos[r][n]['faces_found']:.1f}%" for r in photos),
                     f"{100 * max(photos[r][n]['non_faces_found'] for r in photos):.1f}%",
                     f"{100 * heads['procedural'][n]['found']:.1f}%" if n in heads["procedural"] else "",
                     f"{100 * fixture['found']:.1f}%" if fixture else "", error])
    head = ["detector", *("photographs found, upright" if r == "roll_0" else
                          f"photographs found, rolled ±{r.removeprefix('roll_')}°" for r in photos),
            "non-faces found (worst roll)", "procedural head: false faces", "photo-textured head (fixture): found",
            "its points vs truth, mean"]
    render = doc["render"]
    return (_table(head, rows) + f"\n\nHeads rendered at {render['width']}x{render['height']}, "
            f"{render['cameras']} cameras x {render['frames']} frames; MediaPipe: {doc['mediapipe']}.")


def ingest_load(doc: dict[str, Any]) -> str:
    """The load benchmark's figures (issue 32): what ingestion did, how soon and how fast captures ran, how busy
    each worker was, whether priority held, and whether anything was lost or run twice."""
    ing = doc["ingestion"]
    span = (lambda d: f"{d['median']:.0f} s (least {d['min']:.0f}, most {d['max']:.0f})")  # noqa: E731
    pool = doc["gpu_pool_priority"]
    rows = [
        ["captures uploaded", f"{doc['captures']} in {doc['upload_window_s']:.0f} s"],
        ["capture runs per capture", ", ".join(f"{n} run(s): {c} captures" for n, c in
                                               doc["runs_per_capture"].items())],
        ["ingestion runs (every minute)", f"{ing['ingestion_runs']} ("
                                          + ", ".join(f"{k}: {v}" for k, v in ing["ingestion_run_states"].items())
                                          + ")"],
        ["listed again while running, trigger skipped (run id existed)",
         sum(ing["triggers_skipped_as_existing"].values())],
        ["listed after every run ended", len(ing["listed_after_all_ended"])],
        ["upload to run created", span(doc["run_created_after_upload_s"])],
        ["upload to first task started", span(doc["first_task_after_upload_s"])],
        ["first task to run end, per capture", span(doc["capture_first_task_to_end_s"])],
        ["last capture finished", f"{doc['last_capture_finished_s']:.0f} s after the first upload"],
        ["captures per hour", doc["captures_per_hour"]],
        ["captures in progress (most, mean)", f"{doc['captures_in_progress']['most']}, "
                                              f"{doc['captures_in_progress']['mean']}"],
        ["finish order vs start order (Kendall's tau)", doc["finish_vs_start_order_kendall_tau"]],
        ["GPU pool: higher priority ready first and queued first / not", f"{pool['held']} / {pool['inverted']}"],
        ["task tries", ", ".join(f"{k}: {v}" for k, v in doc["task_tries"].items())],
        ["run states", ", ".join(f"{k}: {v}" for k, v in doc["run_states"].items())],
        ["distinct outputs over all captures", len(doc["distinct_outputs"])],
    ]
    rows += [[f"worker {w}: utilisation, any task running", f"{v['utilisation']:.2f}, {v['any_task_running']:.2f} "
              f"({v['tasks']} tasks, {v['slots']} slots)"] for w, v in doc["workers"].items()]
    rows += [[f"GPU {device}: share of the time leased", share] for device, share in doc["gpu_devices_leased"].items()]
    return _table(["measure", "value"], rows)


def generic(doc: dict[str, Any]) -> str:
    """Every scalar of a results file without a dedicated table, by its path in the JSON."""
    rows: list[list[Any]] = []

    def walk(v: Any, path: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k not in ("machine", "commit", "date", "command", "dirty", "code_digest", "provenance_recovered",
                             "note"):
                    walk(x, f"{path}.{k}" if path else k)
        elif isinstance(v, list) and v and isinstance(v[0], dict | list):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]")
        elif isinstance(v, int | float | str) and not isinstance(v, bool):
            rows.append([f"`{path}`", v])

    walk(doc, "")
    return _table(["measure", "value"], rows[:200])


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "extract_sample": extract_sample, "extract_sample_16core": extract_sample, "e2e_gpu": e2e_gpu,
    "matting_gpu": matting_gpu, "training_gpu": training_gpu, "gaussianhead_gpu": gaussianhead_gpu,
    "backends_gpu": backends_gpu, "landmark_detectors": landmark_detectors, "ingest_load": ingest_load,
}


def render(name: str, results: Path = RESULTS) -> str:
    """The table for ``benchmarks/results/<name>.json`` and its provenance line."""
    doc = load(name, results)
    try:
        body = TABLES.get(name, generic)(doc)
    except (KeyError, TypeError, ValueError):  # a re-run changed the file's shape: still show every number
        body = generic(doc)
    note = f"\n\n{doc['note']}" if isinstance(doc.get("note"), str) and name in TABLES else ""
    return f"{body}{note}\n\n{provenance(doc)}\n"


def all_results(results: Path = RESULTS) -> list[str]:
    return sorted(p.stem for p in results.glob("*.json"))
