"""Where inference and training run: the device choice and mixed precision, in one place."""

from __future__ import annotations

import contextlib
from typing import Any

from medpipe.errors import ConfigError


def resolve_device(requested: str) -> tuple[str, bool]:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; returns (device, mixed precision).

    Raises:
        ConfigError: ``cuda`` was asked for and there is none.
    """
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {requested!r}: expected auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available", hint="use --device auto or cpu")
    device = "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    return device, device == "cuda"


def autocast(device: str, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision (float16) on CUDA when ``enabled``; a no-op elsewhere."""
    import torch

    if enabled and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
