"""Datalists: the ``datalist.json`` every training and inference stage reads, and its items.

A datalist is ``{"train": [...], "val": [...], "test": [...]}`` plus optional top-level keys
(``channels``, ``reference``, ``label_names``, ``class_names``, ...). A segmentation item has
``image`` (a file, or a list of files = channels) and ``label``; a classification item ``image`` and
``class`` (an integer). Items that a GAN made carry ``"synthetic": true`` and may only ever be in
the ``train`` split (:func:`class_items` refuses them anywhere else).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import StageError

#: item keys that hold file paths (a path, or a list of paths for ``image``)
PATH_KEYS = ("image", "label", "reference_volume")
SPLITS = ("train", "val", "test")


def _map_paths(doc: dict[str, Any], fn: Any) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, list):
            return [one(x) for x in v]
        return fn(v) if isinstance(v, str) else v

    out = dict(doc)
    for split in SPLITS:
        if isinstance(doc.get(split), list):
            out[split] = [{k: one(v) if k in PATH_KEYS else v for k, v in it.items()} if isinstance(it, dict) else it
                          for it in doc[split]]
    if isinstance(doc.get("ingest_dir"), str):
        out["ingest_dir"] = fn(doc["ingest_dir"])
    return out


def load_datalist(path: Path) -> dict[str, Any]:
    """Read a datalist; relative item paths are taken from the datalist's own folder (see :func:`datalist_json`)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"datalist {path} cannot be read ({exc}); re-run the dataset stage") from exc
    if not isinstance(doc, dict) or not all(isinstance(doc.get(s, []), list) for s in SPLITS):
        raise StageError(f"datalist {path} is not a medpipe datalist (train / val / test lists)")
    folder = path.resolve().parent
    return _map_paths(doc, lambda v: v if Path(v).is_absolute() else str((folder / v).resolve()))


def datalist_json(doc: dict[str, Any], path: Path, *, relative_within: Path | None = None) -> str:
    """The JSON text of a datalist to be written at ``path``.

    Item paths inside ``relative_within`` (a run folder) are written relative to the datalist's folder,
    so a run folder that is copied or moved keeps working; other paths stay as they are.
    """
    if relative_within is not None:
        folder = path.resolve().parent
        root = relative_within.resolve()

        def rel(v: str) -> str:
            p = Path(v)
            if p.is_absolute() and (p == root or root in p.parents):
                return os.path.relpath(p, folder)
            return v

        doc = _map_paths(doc, rel)
    return json.dumps(doc, indent=1) + "\n"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:48] or "unknown"


def case_name(item: dict[str, Any]) -> str:
    """A file-name stem for an item: patient ID + a short hash of the study UID."""
    study = str(item.get("study_uid") or item.get("reference_volume") or item.get("image"))
    return f"{safe_name(str(item.get('patient_id') or 'case'))}_{hashlib.sha1(study.encode()).hexdigest()[:8]}"


def split_items(doc: dict[str, Any], split: str, *, need_labels: bool, path: Path) -> list[dict[str, Any]]:
    items = doc.get(split, []) if split != "all" else [*doc.get("train", []), *doc.get("val", []), *doc.get("test", [])]
    if need_labels:
        items = [it for it in items if it.get("label")]
    if not items:
        what = "labelled " if need_labels else ""
        raise StageError(f"the {split} split of {path} has no {what}studies; change the dataset stage's split")
    return items


def class_items(doc: dict[str, Any], split: str, *, path: Path) -> list[dict[str, Any]]:
    """The items of ``split`` that have a class; synthetic items outside ``train`` are an error."""
    items = doc.get(split, [])
    if split != "train":
        synthetic = [it for it in items if it.get("synthetic")]
        if synthetic:
            raise StageError(f"{path}: {len(synthetic)} synthetic item(s) in the {split} split (e.g. "
                             f"{synthetic[0].get('image')}); synthetic data may only be used for training")
    out = [it for it in items if it.get("class") is not None]
    if not out:
        raise StageError(f"the {split} split of {path} has no items with a class; check the dataset stage's "
                         "labels and split")
    return out


def model_inputs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"image", "class"}`` of each item: what the networks see.

    Items of one split can carry different extra keys (real items their source index, synthetic ones
    ``synthetic`` and ``generator``), and MONAI's collate builds a batch from the first item's keys.
    """
    return [{"image": it["image"], "class": int(it["class"])} for it in items]


def class_names(doc: dict[str, Any], items: list[dict[str, Any]]) -> dict[int, str]:
    """Class index -> name: the datalist's ``class_names``, else ``class k`` up to the largest class seen."""
    names = {int(k): str(v) for k, v in (doc.get("class_names") or {}).items()}
    top = max([int(it["class"]) for it in items] + list(names) + [1])
    return {c: names.get(c, f"class {c}") for c in range(top + 1)}


def class_counts(items: list[dict[str, Any]], n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray([int(it["class"]) for it in items], dtype=np.int64), minlength=n_classes)


def spatial_dims_of(items: list[dict[str, Any]]) -> int:
    """2 for PNG / JPEG / 2D NIfTI images, else 3 (from the first item's file name or header)."""
    image = items[0]["image"]
    first = str(image[0] if isinstance(image, list) else image)
    if first.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        return 2
    try:
        import nibabel as nib

        shape = nib.load(first).shape  # type: ignore[attr-defined]
    except Exception as exc:  # any unreadable file: say which one
        raise StageError(f"cannot read {first} to tell 2D from 3D ({type(exc).__name__}: {exc}); "
                         "set spatial_dims") from exc
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3
