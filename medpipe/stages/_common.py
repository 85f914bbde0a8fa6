"""Helpers every training / inference stage shares: inputs from earlier stages, datalists,
transforms for unlabelled items, seeded augmentation, atomic checkpoints, file names for cases.

Not a stage (nothing is registered here).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

from medpipe.errors import StageError
from medpipe.io import atomic_path


def load_datalist(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"datalist {path} cannot be read ({exc}); re-run the dataset stage") from exc
    if not isinstance(doc, dict) or not all(isinstance(doc.get(s, []), list) for s in ("train", "val", "test")):
        raise StageError(f"datalist {path} is not a medpipe datalist (train / val / test lists)")
    return doc


def tolerate_missing_keys(spec: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``spec`` with ``allow_missing_keys: true`` on every dictionary transform (for items without labels)."""
    from medpipe.data.transforms import _transform_classes

    classes = _transform_classes()
    out = []
    for item in spec:
        name, args = next(iter(item.items()))
        args = dict(args or {})
        cls = classes.get(name)
        if cls is not None and "allow_missing_keys" in inspect.signature(cls).parameters:
            args.setdefault("allow_missing_keys", True)
        out.append({name: args})
    return out


def set_random_state(transform: Any, seed: int) -> None:
    """Seed every random transform of a Compose (reproducible augmentation)."""
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))


def save_checkpoint(path: Path, doc: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:48] or "unknown"


def case_name(item: dict[str, Any]) -> str:
    """A file-name stem for an item: patient ID + a short hash of the study UID."""
    study = str(item.get("study_uid") or item.get("reference_volume") or item.get("image"))
    return f"{safe_name(str(item.get('patient_id') or 'case'))}_{hashlib.sha1(study.encode()).hexdigest()[:8]}"


def read_checkpoint(path: Path | str, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The document of a medpipe checkpoint of format ``fmt`` (tensors only: ``weights_only=True``).

    Raises:
        StageError: unreadable, another kind of file (``what`` names the expected one), or newer than ``version``.
    """
    import torch

    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a user problem here
        raise StageError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise StageError(f"{path} is not a {what}")
    if int(doc.get("version", 0)) > version:
        raise StageError(f"{what} {path} was written by a newer medpipe (format {doc.get('version')})")
    return doc
