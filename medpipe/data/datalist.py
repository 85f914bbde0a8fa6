"""Datalists: the ``datalist.json`` every training and inference stage reads, and its items.

A datalist is ``{"train": [...], "val": [...], "test": [...]}`` plus optional top-level keys
(``channels``, ``reference``, ``label_names``, ``class_names``, ...). A segmentation item has
``image`` (a file, or a list of files = channels) and ``label``; a classification item ``image`` and
``class`` (an integer). Items that a GAN made carry ``"synthetic": true`` and may only ever be in
the ``train`` split (:func:`class_items` refuses them anywhere else).

The format is defined once, by the pydantic models :class:`Datalist` and :class:`DatalistItem`; its
JSON schema (:func:`datalist_schema`) is ``medpipe/data/datalist.schema.json`` (tested to be current).
:func:`load_datalist` checks every datalist it reads against them, plus what a schema cannot say:
one path per declared channel, every file present, a patient in one split only; each problem is one
line naming the datalist and the item (``train[3] (patient P07): image[1]: ... does not exist``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medpipe.errors import StageError

#: item keys that hold file paths (a path, or a list of paths for ``image``)
PATH_KEYS = ("image", "label", "reference_volume")
SPLITS = ("train", "val", "test")
#: at most this many problems are listed when a datalist is refused
MAX_PROBLEMS = 10


NonEmpty = Annotated[str, Field(min_length=1)]
Coordinate = Annotated[float, Field(ge=-1e6, le=1e6)]


class FindingItem(BaseModel):
    """A point finding with a size (a lung nodule): what a detector is trained on and scored against."""

    model_config = ConfigDict(extra="allow")

    center_lps: Annotated[list[Coordinate], Field(min_length=3, max_length=3)] = Field(
        description="the centre in DICOM patient coordinates (LPS, mm) of the image's frame of reference")
    diameter_mm: float = Field(gt=0, le=1e4, description="its diameter (mm)")
    label: str | None = Field(None, description="a name (e.g. the SR's tracking identifier)")


class DatalistItem(BaseModel):
    """One case of a datalist. Other keys are allowed (and kept) for provenance."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    image: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] = Field(
        description="the image file, or one file per channel (in the order of the datalist's channels); absolute or "
                    "relative to the datalist")
    label: str | None = Field(None, description="segmentation: the label map (integer values) on the image grid")
    class_: int | None = Field(None, alias="class", ge=0, description="classification: the class index")
    patient_id: str | None = Field(None, description="cases of one patient stay in one split (k-fold included)")
    study_uid: str | None = Field(None, description="the study (DICOM) or case id; names output files")
    reference_volume: str | None = Field(None, description="the volume whose grid predictions are written on "
                                                           "(default: the last channel)")
    has_foreground: bool | None = Field(None, description="the label map has a labelled voxel (k-fold strata)")
    findings: list[FindingItem] | None = Field(None, description="detection: the findings (e.g. nodules) of the "
                                                                 "case; [] none, null unlabelled")
    synthetic: bool = Field(False, description="made by a GAN (augment): allowed in train only")


class Datalist(BaseModel):
    """A ``datalist.json``: the three splits and what describes them. Other keys are allowed (provenance)."""

    model_config = ConfigDict(extra="allow")

    train: list[DatalistItem] = Field(default_factory=list)
    val: list[DatalistItem] = Field(default_factory=list)
    test: list[DatalistItem] = Field(default_factory=list)
    channels: list[str] | None = Field(None, description="channel names, one per image file of every item")
    reference: str | None = Field(None, description="the channel whose grid the others and the label are on")
    channel_rules: dict[str, dict[str, Any]] | None = Field(
        None, description="DICOM series selection rules per channel (dataset stage), for medpipe score")
    label_names: dict[str, str] | None = Field(None, description="label value -> name (background omitted)")
    label_codes: dict[str, dict[str, dict[str, str]]] | None = Field(
        None, description="label value -> coded concepts {category, type: {scheme, value, meaning}} (from a DICOM SEG)")
    class_names: dict[str, str] | None = Field(None, description="class index -> name")
    skipped: list[dict[str, Any]] = Field(default_factory=list, description="cases left out, with the reason")


def datalist_schema() -> dict[str, Any]:
    """The JSON schema of a datalist (``medpipe/data/datalist.schema.json``)."""
    schema = Datalist.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "medpipe datalist"
    return schema


def _item_name(raw: dict[str, Any], split: str, index: int) -> str:
    items = raw.get(split)
    it = items[index] if isinstance(items, list) and 0 <= index < len(items) else None
    who = ""
    if isinstance(it, dict):
        for key in ("patient_id", "case_id", "study_uid"):
            if it.get(key):
                who = f" ({key.split('_')[0]} {it[key]})"
                break
    return f"{split}[{index}]{who}"


def _problems(raw: dict[str, Any], doc: dict[str, Any], check_files: bool) -> list[str]:
    """Schema problems, then channel counts, missing files and patients in several splits."""
    try:
        Datalist.model_validate(raw)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = list(err["loc"])
            if len(loc) >= 2 and loc[0] in SPLITS and isinstance(loc[1], int):
                where = _item_name(raw, str(loc[0]), loc[1]) + "".join(
                    f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[2:])
            else:
                where = ".".join(str(p) for p in loc) or "the document"
            where = where.replace(".class_", ".class")
            out.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        return out
    out = []
    channels = doc.get("channels")
    where_patient: dict[str, str] = {}
    for split in SPLITS:
        for i, it in enumerate(doc.get(split, [])):
            name = _item_name(raw, split, i)
            image = it["image"]
            if channels and len(image if isinstance(image, list) else [image]) != len(channels):
                n = len(image) if isinstance(image, list) else 1
                out.append(f"{name}: image: {n} file(s) for the {len(channels)} channels {channels}")
            if check_files:
                for key in PATH_KEYS:
                    value = it.get(key)
                    for k, path in enumerate(value if isinstance(value, list) else [value]):
                        if isinstance(path, str) and not Path(path).exists():
                            idx = f"[{k}]" if isinstance(value, list) else ""
                            out.append(f"{name}: {key}{idx}: {path} does not exist")
            pid = it.get("patient_id")
            if pid is not None and not it.get("synthetic"):
                first = where_patient.setdefault(str(pid), split)
                if first != split:
                    out.append(f"{name}: patient {pid} is also in the {first} split; a patient's cases must stay in "
                               "one split (or results leak between splits)")
                    where_patient[str(pid)] = split
    return out


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


def load_datalist(path: Path, *, check_files: bool = True) -> dict[str, Any]:
    """Read and check a datalist; relative item paths are taken from the datalist's own folder (see
    :func:`datalist_json`).

    Raises:
        StageError: unreadable, or not a valid datalist: one line per problem (at most ``MAX_PROBLEMS``),
            each naming the item (``check_files``: also every file of every item must exist).
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"datalist {path} cannot be read ({exc}); re-run the stage that wrote it") from exc
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s, []), list) for s in SPLITS):
        raise StageError(f"datalist {path} is not a medpipe datalist (train / val / test lists)",
                         hint="the format: README 'The datalist format', schema medpipe/data/datalist.schema.json")
    folder = path.resolve().parent
    doc = _map_paths(raw, lambda v: v if Path(v).is_absolute() else str((folder / v).resolve()))
    problems = _problems(raw, doc, check_files)
    if problems:
        more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise StageError("\n".join(f"datalist {path}: {p}" for p in problems[:MAX_PROBLEMS]) + more,
                         hint="the format: README 'The datalist format', schema medpipe/data/datalist.schema.json")
    return doc


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
