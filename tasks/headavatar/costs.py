"""The measured cost of a capture, stage by stage, read from its manifests (``headavatar costs``).

Every number is what the run recorded (:mod:`headavatar.contract.usage` and the output writer):
wall, CPU and GPU seconds, peak memory, scratch disk and bytes stored in the bucket. Manifests
written before the runner recorded usage show ``-`` for those columns. CPU seconds count the stage
process and the children it waited for: stage 1's camera workers, forked by a server process, are
not in them (their peak memory is in the extract manifest's ``worker_peak_rss_mb``).
"""

from __future__ import annotations

from typing import Any

from headavatar.contract.stage import read_manifest
from headavatar.storage import ObjectStore

COLUMNS = (("wall_s", "wall s"), ("cpu_s", "CPU s"), ("gpu_s", "GPU s"), ("peak_rss_mb", "peak RSS MB"),
           ("peak_gpu_mib", "peak GPU MiB"), ("scratch_mb", "scratch MB"), ("files", "files"),
           ("stored_mb", "stored MB"))


def capture_costs(store: ObjectStore, capture: str, stages: list[str]) -> list[dict[str, Any]]:
    """One row per stage that has a manifest, plus a ``total`` row (sums; peaks are maxima)."""
    rows = []
    for stage in stages:
        m = read_manifest(store, capture, stage)
        if m is None:
            continue
        metrics = m.metrics
        rows.append({"stage": stage, "wall_s": m.wall_time_s, **{k: metrics.get(k) for k, _ in COLUMNS[1:6]},
                     "files": len(m.files), "stored_mb": round(sum(f.size for f in m.files.values()) / 1e6, 1),
                     "finished_at": m.finished_at})
    if rows:
        total: dict[str, Any] = {"stage": "total"}
        for key, _ in COLUMNS:
            values = [r[key] for r in rows if r.get(key) is not None]
            peak = key.startswith("peak") or key == "scratch_mb"
            total[key] = None if not values else round(max(values) if peak else sum(values), 2)
        rows.append(total)
    return rows


def as_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = ["stage", *(title for _, title in COLUMNS)]
    body = [[r["stage"], *(cell(r.get(k)) for k, _ in COLUMNS)] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head, *body])
    return "\n".join(lines)
