"""Picks the matting method from ``matting.method``; the network's PyTorch code loads only when asked for."""

from __future__ import annotations

from pathlib import Path

from headavatar.assets import fetch_asset
from headavatar.errors import ConfigError
from headavatar.matting.base import Matter
from headavatar.settings import MattingConfig
from headavatar.storage import ObjectStore

NO_WEIGHTS = ("matting.method=bmv2 needs matting.weights (a local path or s3://bucket/key of pytorch_resnet101.pth); "
              "set matting.method=classical to run without weights")


def build_matter(cfg: MattingConfig, store: ObjectStore, scratch: Path) -> Matter:
    """The configured method, ready to run; a weights problem fails here, before any frame is read."""
    if cfg.method == "classical":
        from headavatar.matting.classical import ClassicalMatter

        return ClassicalMatter(cfg)
    if not cfg.weights:
        raise ConfigError(NO_WEIGHTS)
    from headavatar.matting.bmv2 import BMV2Matter

    return BMV2Matter(cfg, fetch_asset(store, cfg.weights, "matting.weights", scratch))
