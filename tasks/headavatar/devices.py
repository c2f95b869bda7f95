"""Torch device selection and optional-backend discovery shared by the GPU-capable stages."""

from __future__ import annotations

import importlib.util

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def installed(module: str) -> bool:
    """Whether an optional backend can be imported, without importing it (CUDA extensions are slow)."""
    return importlib.util.find_spec(module) is not None
