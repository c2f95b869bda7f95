"""Compare trained avatars across runs and captures from the MLflow tracking server.

One row per distinct trained model (stage runs are deduplicated by their manifest digest: a cache
hit in a later DAG run is the same avatar, not a new one). Written as a text table, CSV, and a
self-contained HTML page with one bar chart per held-out metric (inline SVG, no plotting library),
and optionally as an MLflow run of kind ``compare`` holding the three (what the ``headavatar_compare``
DAG does each time an avatar is finished).
"""

from __future__ import annotations

import csv
import html
import io
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headavatar.errors import PipelineError
from headavatar.tracking import experiment_name, pipeline_experiment

COLUMNS = ("capture", "run_name", "run_id", "started", "model_version", "steps", "wall_time_s")
# Held-out metrics and whether higher is better (shown on the chart).
METRICS = {"holdout_psnr": True, "holdout_ssim": True, "holdout_lpips": False, "holdout_iou": True}
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


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


def as_html(rows: list[dict[str, Any]], title: str) -> str:
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(dict.fromkeys(r["capture"] for r in rows))}
    charts = "".join(_bar_chart(rows, k, colors) for k in metric_columns(rows))
    legend = " ".join(f'<span style="color:{c}">&#9632;</span> {html.escape(k)}' for k, c in colors.items())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*COLUMNS, *metric_columns(rows)])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>"
                                    for c in [*COLUMNS, *metric_columns(rows)]) + "</tr>" for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{legend}</p>{charts}<table><tr>{head}</tr>{body}</table>"
            "</body></html>\n")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else str(v)


def _bar_chart(rows: list[dict[str, Any]], metric: str, colors: dict[str, str]) -> str:
    vals = [(r, r[metric]) for r in rows if metric in r]
    w, h, pad, bar = 60 + 28 * len(vals), 220, 40, 20
    top = max(v for _, v in vals) or 1.0
    better = "higher" if METRICS[metric] else "lower"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 60}" role="img" '
             f'aria-label="{metric}"><text x="4" y="14" font-size="13">{metric} ({better} is better)</text>',
             f'<line x1="{pad}" y1="{h}" x2="{w}" y2="{h}" stroke="#333"/>']
    for i, (r, v) in enumerate(vals):
        x, bh = pad + 4 + 28 * i, (h - 30) * v / top
        label = html.escape(f"{r['capture']} {r['run_name']}: {_fmt(v)}")
        parts.append(f'<rect x="{x}" y="{h - bh:.1f}" width="{bar}" height="{bh:.1f}" '
                     f'fill="{colors[r["capture"]]}"><title>{label}</title></rect>')
        parts.append(f'<text x="{x + bar / 2}" y="{h - bh - 3:.1f}" font-size="9" text-anchor="middle">'
                     f'{_fmt(round(v, 2))}</text>')
        parts.append(f'<text x="{x + 4}" y="{h + 8}" font-size="9" transform="rotate(60 {x + 4} {h + 8})">'
                     f'{html.escape(r["capture"])}#{i + 1}</text>')
    return "".join(parts) + "</svg>"


def write_reports(rows: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.csv", out / "compare.html"]
    paths[0].write_text(as_csv(rows))
    paths[1].write_text(as_html(rows, title))
    return paths


def log_report(tracking_uri: str, rows: list[dict[str, Any]], title: str, stage: str) -> str:
    """The report as a new run (tag ``headavatar.kind = compare``, so :func:`collect` never reads it back) in the
    pipeline's experiment: ``compare.txt``, ``compare.csv``, ``compare.html``; returns the run id."""
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
        paths = write_reports(rows, out, title)
        (out / "compare.txt").write_text(as_table(rows) + "\n")
        for path in [out / "compare.txt", *paths]:
            client.log_artifact(run.info.run_id, str(path))
    client.log_metric(run.info.run_id, "avatars", len(rows))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
