"""``headavatar export web``: a capture's trained avatar as the animated page of :mod:`headavatar.web_viewer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headavatar.render_avatar import load_avatar
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore
from headavatar.web_viewer import avatar_page


def export_web(store: ObjectStore, capture: str, config: PipelineConfig, out: Path, sequence: str | None = None,
               fps: float = 10.0) -> dict[str, Any]:
    """``headavatar export web``: the page of a capture's trained avatar, written whole to ``out``."""
    trainer = load_avatar(store, capture, config)
    page, info = avatar_page(trainer, f"Avatar {capture}", sequence, fps)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(page)
    part.replace(out)
    return {"capture": capture, "out": str(out), **{k: v for k, v in info.items() if not k.startswith("position")}}
