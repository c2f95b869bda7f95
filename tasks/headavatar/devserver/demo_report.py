"""``index.html`` in the demo's output folder: a capture's results for a person, without MLflow.

The pictures each stage wrote (copied from the bucket by ``make demo``), with what every panel shows,
the avatar's held-out scores and the protocol they were measured under, its videos, and links to the
MLflow runs (the pipeline's parent run, each stage's run) and the registered model version. One static
page, no script: it opens from the file system.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

# What a stage's pictures show: a caption per file-name prefix, and the column labels of the sheets
# whose columns are panels (left to right); rows are cameras.
PICTURES: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "matting": [("", "the matte over each camera's image (one sheet per sampled frame)", ())],
    "fitting": [("landmarks_", "the 68 detected landmarks over every camera (missing cameras crossed out)", ()),
                ("fit_", "the fitted 3DMM mesh and its landmarks over every camera", ())],
    "meshhead": [("", "held-out cameras, one per row", ("ground truth", "mesh-head render", "normals"))],
    "gaussianhead": [("", "held-out cameras, one per row", ("ground truth", "avatar render", "difference x4"))],
}
# The avatar's figures on the page and the console, in this order, where the stage measured them.
QUALITY = (("holdout_psnr", "PSNR", "{:.2f} dB"), ("holdout_ssim", "SSIM", "{:.4f}"),
           ("holdout_lpips", "LPIPS", "{:.4f}"), ("self_reenactment_psnr", "self-reenactment PSNR", "{:.2f} dB"))
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}img{image-rendering:pixelated;max-width:100%}
.cols{display:flex}.cols span{flex:1;text-align:center;font-weight:bold}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}figure{margin:1em 0;display:table}
video{width:min(100%,640px);image-rendering:pixelated}"""


def quality_line(metrics: dict[str, Any], protocol: str | None) -> str:
    """The avatar's held-out figures as one line, e.g. ``PSNR 24.61 dB, SSIM 0.8123 (headavatar-eval/1)``."""
    parts = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in QUALITY
             if isinstance(metrics.get(key), (int, float))]
    return ", ".join(parts) + (f" (protocol {protocol})" if protocol and parts else "") if parts else "not measured"


def write_index(folder: Path, capture: str, metrics: dict[str, dict[str, Any]], mlflow: dict[str, Any],
                protocol: str | None) -> Path:
    """``folder/index.html`` over the stage folders below ``folder``; ``metrics`` per stage (manifests),
    ``mlflow`` as the demo finds it (``url``, ``model_url``, ``stages``: stage -> run URL)."""
    e = html.escape
    out = [f"<!doctype html><meta charset=utf-8><title>Avatar {e(capture)}</title><style>{STYLE}</style>",
           f"<h1>Capture {e(capture)}: Gaussian head avatar</h1>",
           f"<p>Held-out quality: <b>{e(quality_line(metrics.get('gaussianhead', {}), protocol))}</b>. "
           f"MLflow: <a href='{e(mlflow.get('url', ''))}'>pipeline run</a>, "
           f"<a href='{e(mlflow.get('model_url', ''))}'>registered model "
           f"{e(str(mlflow.get('registered_model', '')))} version {e(str(mlflow.get('version', '')))}</a>.</p>"]
    rows = [(label, fmt.format(metrics.get("gaussianhead", {})[key])) for key, label, fmt in QUALITY
            if isinstance(metrics.get("gaussianhead", {}).get(key), (int, float))]
    if isinstance(metrics.get("meshhead", {}).get("holdout_iou"), (int, float)):
        rows.append(("mesh-head silhouette IoU", f"{metrics['meshhead']['holdout_iou']:.4f}"))
    if rows:
        out.append("<table><tr><th>held-out metric</th><th>value</th></tr>"
                   + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows) + "</table>")
    videos = sorted((folder / "gaussianhead" / "videos").glob("*.mp4"))
    if videos:
        out.append("<h2>Videos</h2>")
        for v in videos:
            rel = v.relative_to(folder).as_posix()
            out.append(f"<figure><video controls src='{e(rel)}'></video><figcaption>{e(v.stem)} "
                       f"(<a href='{e(rel)}'>{e(rel)}</a>)</figcaption></figure>")
    page = folder / "gaussianhead" / "viewer" / "avatar.html"
    if page.exists():
        rel = page.relative_to(folder).as_posix()
        out.append(f"<h2>Animated avatar</h2><p><a href='{e(rel)}'>{e(rel)}</a>: the avatar playing a sequence "
                   f"beside the ground truth; orbit it with the mouse. It needs a web server (browsers run its "
                   f"workers only for pages served over HTTP): <code>make demo-ui</code> serves it and prints "
                   f"the address.</p>")
    for stage, kinds in PICTURES.items():
        pictures = sorted(p for p in (folder / stage).rglob("*.jpg")) if (folder / stage).exists() else []
        if not pictures:
            continue
        run = mlflow.get("stages", {}).get(stage)
        link = f" (<a href='{e(run)}'>MLflow run</a>)" if run else ""
        out.append(f"<h2>{e(stage)}{link}</h2>")
        for prefix, caption, columns in kinds:
            for p in (p for p in pictures if p.name.startswith(prefix)):
                rel = p.relative_to(folder).as_posix()
                labels = "".join(f"<span>{e(c)}</span>" for c in columns)
                cols = f"<div class=cols>{labels}</div>" if columns else ""
                out.append(f"<figure>{cols}<img src='{e(rel)}' alt='{e(stage)} {e(p.stem)}'>"
                           f"<figcaption>{e(rel)}: {e(caption)}</figcaption></figure>")
    path = folder / "index.html"
    path.write_text("\n".join(out) + "\n")
    return path
