"""Running the shipped pipeline files at a tiny size: ``--set`` options from a dictionary."""

from __future__ import annotations

import json
from typing import Any


def set_options(values: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments (values as JSON, so lists and numbers keep their types)."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out
