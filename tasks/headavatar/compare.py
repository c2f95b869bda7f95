"""Compare trained avatars across runs and captures from the MLflow tracking server.

One row per distinct trained model (stage runs are deduplicated by their manifest digest: a cache
hit in a later DAG run is the same avatar, not a new one). Written as a text table, CSV, and an
HTML page: per held-out metric a bar chart (matplotlib, as inline SVG), then per capture its avatar
variants with their held-out metrics, the settings in which they differ, and their videos side by
side (embedded while they fit ``INLINE_VIDEO_MB``, so the one file shows them in MLflow's artifact
view). Optionally logged as an MLflow run of kind ``compare`` whose page every compared model version
links to (what the ``headavatar_compare`` DAG does each time an avatar is finished).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headavatar.errors import PipelineError
from headavatar.tracking import experiment_name, model_name, pipeline_experiment

COLUMNS = ("capture", "run_name", "run_id", "started", "model_version", "steps", "wall_time_s")
# Held-out metrics and whether higher is better (shown on the chart).
METRICS = {"holdout_psnr": True, "holdout_ssim": True, "holdout_lpips": False, "holdout_iou": True}
VIDEOS = "videos"  # the stage run's artifact folder of avatar videos (tracking.py logs them)
INLINE_VIDEO_MB = 48  # videos embedded in compare.html up to this many MB in all; the rest are linked files
UI_URL_ENV = "HEADAVATAR_MLFLOW_UI_URL"  # the MLflow URL a browser opens (the Airflow task sets it)
REPORT_TAG = "headavatar.compare_report"  # on each compared model version: the report's page in MLflow


def collect(tracking_uri: str, captures: list[str] | None, stage: str) -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment_name())
    except MlflowException as e:
        raise PipelineError(f"cannot read MLflow at {tracking_uri}: {str(e).splitlines()[0][:200]}") from None
    if exp is None:
        return []
    flt = f"tags.`headavatar.kind` = 'stage' and tags.`headavatar.stage` = '{stage}'"
    runs = []
    for capture in captures or [None]:
        extra = f" and tags.`headavatar.capture` = '{capture}'" if capture else ""
        token = None
        while True:
            page = client.search_runs([exp.experiment_id], filter_string=flt + extra, max_results=500,
                                      order_by=["attributes.start_time ASC"], page_token=token)
            runs += page
            if not (token := page.token):
                break
    parents = {}
    rows, seen = [], set()
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        digest = tags.get("headavatar.manifest")
        if digest is None or digest in seen:  # not finished tracking, or the same model again (cache hit)
            continue
        seen.add(digest)
        parent_id = tags.get("mlflow.parentRunId", "")
        if parent_id and parent_id not in parents:
            parents[parent_id] = client.get_run(parent_id).info.run_name
        m = run.data.metrics
        rows.append({
            "capture": tags.get("headavatar.capture", ""), "run_name": parents.get(parent_id, ""),
            "settings": dict(run.data.params), "variant": tags.get("headavatar.variant", ""),
            "run_id": run.info.run_id,
            "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
            "model_version": tags.get("headavatar.model_version", ""),
            "steps": int(m["steps"]) if "steps" in m else "", "wall_time_s": round(m.get("wall_time_s", 0.0), 1),
            **{k: m[k] for k in METRICS if k in m},
        })
    return sorted(rows, key=lambda r: (r["capture"], r["started"]))


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in METRICS if any(k in r for r in rows)]


def as_table(rows: list[dict[str, Any]]) -> str:
    cols = [*COLUMNS, *metric_columns(rows)]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def as_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, [*COLUMNS, *metric_columns(rows)], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def differing_settings(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per avatar (by run id), the settings in which it differs from the other avatars of its capture."""
    out: dict[str, dict[str, str]] = {}
    for capture in dict.fromkeys(r["capture"] for r in rows):
        group = [r for r in rows if r["capture"] == capture]
        keys = sorted({k for r in group for k in r.get("settings", {})})
        differ = [k for k in keys if len({r.get("settings", {}).get(k, "") for r in group}) > 1]
        for r in group:
            out[r["run_id"]] = {k: r.get("settings", {}).get(k, "") for k in differ}
    return out


def fetch_videos(tracking_uri: str, rows: list[dict[str, Any]], out: Path) -> dict[str, list[Path]]:
    """Each avatar's videos, downloaded from its run's artifacts to ``out/videos/<run id>/``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found: dict[str, list[Path]] = {}
    for r in rows:
        names = [a.path for a in client.list_artifacts(r["run_id"], VIDEOS) if a.path.endswith(".mp4")]
        if names:
            dest = out / VIDEOS / r["run_id"]
            dest.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest) as tmp:  # MLflow keeps the artifact's folder: drop it
                found[r["run_id"]] = [Path(client.download_artifacts(r["run_id"], n, tmp)).replace(dest / Path(n).name)
                                      for n in names]
    return found


def label(row: dict[str, Any]) -> str:
    """How an avatar is named in the report: its capture and model version (else its run name)."""
    return f"{row['capture']} v{row['model_version']}" if row.get("model_version") else \
        f"{row['capture']} {row['run_name'] or row['run_id'][:8]}"


def as_html(rows: list[dict[str, Any]], title: str, videos: dict[str, list[Path]] | None = None,
            base: Path | None = None) -> str:
    """The report page; ``videos`` (from :func:`fetch_videos`) are embedded while they fit, else linked
    relative to ``base`` (the folder the page is written to)."""
    differ = differing_settings(rows)
    budget = [INLINE_VIDEO_MB * 2**20]
    charts = "".join(_bar_chart(rows, k) for k in metric_columns(rows))
    sections = "".join(_capture_section(rows, c, differ, videos or {}, base, budget)
                       for c in dict.fromkeys(r["capture"] for r in rows))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*COLUMNS, *metric_columns(rows)])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>"
                                    for c in [*COLUMNS, *metric_columns(rows)]) + "</tr>" for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;vertical-align:top}"
            ".charts{display:flex;flex-wrap:wrap;gap:12px}.videos{display:flex;flex-wrap:wrap;gap:12px}"
            "figure{margin:0}figcaption{font-size:12px}video{max-width:360px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from MLflow: "
            f"one avatar per distinct trained model; held-out metrics on the avatar's own held-out cameras "
            f"and sequences (docs/stages/gaussianhead.md).</p><div class='charts'>{charts}</div>{sections}"
            f"<h2>All avatars</h2><table><tr>{head}</tr>{body}</table></body></html>\n")


def _capture_section(rows: list[dict[str, Any]], capture: str, differ: dict[str, dict[str, str]],
                     videos: dict[str, list[Path]], base: Path | None, budget: list[int]) -> str:
    group = [r for r in rows if r["capture"] == capture]
    metrics = [k for k in METRICS if any(k in r for r in group)]
    keys = sorted({k for r in group for k in differ.get(r["run_id"], {})})
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["avatar", "started", "steps", *metrics,
                                                          "settings that differ"])
    body = ""
    for r in group:
        settings = "<br>".join(f"{html.escape(k)} = {html.escape(differ[r['run_id']][k])}" for k in keys) or \
            ("(the only avatar)" if len(group) == 1 else "(same settings)")
        cells = [label(r), r["started"], _fmt(r.get("steps", "")), *(_fmt(r.get(k, "")) for k in metrics)]
        body += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + f"<td>{settings}</td></tr>"
    clips = ""
    for r in group:
        for path in videos.get(r["run_id"], []):
            caption = f"{label(r)}: {path.stem}" + "".join(f", {k.split('.')[-1]}={differ[r['run_id']][k]}"
                                                           for k in keys)
            clips += (f"<figure><video controls muted loop playsinline src='{_video_src(path, base, budget)}'>"
                      f"</video><figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f"<h2>Capture {html.escape(capture)}: {len(group)} avatar{'s' if len(group) != 1 else ''}</h2>"
            f"<table><tr>{head}</tr>{body}</table>" + (f"<div class='videos'>{clips}</div>" if clips else ""))


def _video_src(path: Path, base: Path | None, budget: list[int]) -> str:
    """A data: URI while the budget lasts (the page alone shows it, also in MLflow), else a relative link."""
    size = path.stat().st_size
    if size <= budget[0] or base is None:
        budget[0] -= size
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    return html.escape(path.relative_to(base).as_posix())


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else str(v)


def _bar_chart(rows: list[dict[str, Any]], metric: str) -> str:
    """One bar per avatar, coloured by capture, drawn by matplotlib as SVG (text kept as text)."""
    import matplotlib
    from matplotlib.figure import Figure

    vals = [r for r in rows if metric in r]
    captures = list(dict.fromkeys(r["capture"] for r in vals))
    palette = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": metric}):
        fig = Figure(figsize=(max(3.5, 0.55 * len(vals) + 1.5), 3.2), layout="constrained")
        ax = fig.add_subplot()
        bars = ax.bar(range(len(vals)), [r[metric] for r in vals],
                      color=[palette(captures.index(r["capture"]) % 10) for r in vals])
        ax.bar_label(bars, labels=[f"{r[metric]:.3g}" for r in vals], fontsize=8)
        ax.set_xticks(range(len(vals)), [label(r) for r in vals], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({'higher' if METRICS[metric] else 'lower'} is better)", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return f"<figure role='img' aria-label='{metric}'>{svg[svg.index('<svg'):]}</figure>"


def write_reports(rows: list[dict[str, Any]], out: Path, title: str,
                  videos: dict[str, list[Path]] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.csv", out / "compare.html"]
    paths[0].write_text(as_csv(rows))
    paths[1].write_text(as_html(rows, title, videos, out))
    return paths


def log_report(tracking_uri: str, rows: list[dict[str, Any]], title: str, stage: str) -> str:
    """The report as a new run (tag ``headavatar.kind = compare``, so :func:`collect` never reads it back) in the
    pipeline's experiment: ``compare.txt``, ``compare.csv``, ``compare.html`` and the videos it links (not those
    it embeds); each
    compared model version gets the tag :data:`REPORT_TAG` with the report's URL. Returns the run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = pipeline_experiment(client)
    tags = {"headavatar.kind": "compare", "headavatar.stage": stage,
            "headavatar.captures": ",".join(sorted({r["capture"] for r in rows}))}
    if os.environ.get("HEADAVATAR_RUN_ID"):  # set by the Airflow task
        tags["airflow.run_id"] = os.environ["HEADAVATAR_RUN_ID"]
    run = client.create_run(exp_id, run_name=f"compare {datetime.now(UTC):%Y-%m-%d %H:%M}", tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        videos = fetch_videos(tracking_uri, rows, out)
        page = write_reports(rows, out, title, videos)[1].read_text()
        for path in (p for paths in videos.values() for p in paths):
            if path.relative_to(out).as_posix() not in page:  # embedded: not logged a second time
                path.unlink()
        (out / "compare.txt").write_text(as_table(rows) + "\n")
        client.log_artifacts(run.info.run_id, str(out))
    client.log_metric(run.info.run_id, "avatars", len(rows))
    client.set_terminated(run.info.run_id)
    ui = (os.environ.get(UI_URL_ENV) or tracking_uri).rstrip("/")
    url = f"{ui}/#/experiments/{exp_id}/runs/{run.info.run_id}/artifacts/compare.html"
    for r in rows:
        if r.get("model_version"):
            client.set_model_version_tag(model_name(r["capture"]), r["model_version"], REPORT_TAG, url)
    return run.info.run_id
