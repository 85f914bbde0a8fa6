"""NIfTI datasets in the layouts people already have -> a medpipe datalist (no DICOM, no ingest).

Three layouts are read (:func:`read_source`):

* **nnU-Net v2 raw** (``nnunet``): ``imagesTr/<case>_<XXXX>.nii.gz`` (one file per channel, ``XXXX`` the
  channel index), ``labelsTr/<case>.nii.gz`` and ``dataset.json`` with ``channel_names``
  (``{"0": "FLAIR", "1": "T1c"}``), ``labels`` (``{"background": 0, "edema": 1, ...}``) and
  ``file_ending``. Region-based label entries (``"whole tumor": [1, 2, 3]``) declare their values with
  generic names. ``imagesTs`` (unlabelled) is not imported.
* **Medical Segmentation Decathlon** (``msd``): ``dataset.json`` with ``modality``
  (``{"0": "FLAIR", ...}``), ``labels`` (``{"0": "background", "1": "edema", ...}``) and ``training``
  (``[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]``). Multi-channel images are 4D
  (channels last): each channel is written as its own 3D file under ``OUT/images``.
* **CSV** (``csv``): a header row, ``case_id`` (required), optionally ``patient_id`` (several cases of one
  patient stay in one split) and ``label``, and one column per channel named by the channel (or
  ``image_<channel>``); paths are absolute or relative to the CSV's folder. Label names are given
  (``label_names``) or, without them, every label value found is named ``label <value>``.

Every case is checked (:func:`build_cases`): channels on the reference channel's grid (same shape and
affine); a channel on another grid is resampled onto it in world space (trilinear, written under
``OUT/images``, and said so: logged, counted and listed in the datalist's ``resampled``), one that does
not overlap it at all is an error; the label map must hold non-negative integers that are all
declared label values, and sit on the reference grid (otherwise it is resampled with nearest
neighbour, and said so). A case that fails a check is skipped with a one-line reason (``skipped``).

:func:`import_nifti_dataset` splits the cases by patient (stratified by label presence, as the
``dataset`` stage) and writes ``OUT/datalist.json`` and ``OUT/import.json``; ``medpipe import
nnunet|msd|csv SRC --out DIR`` and the ``dataset`` stage's ``source:`` call it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from medpipe.data.datalist import datalist_json, safe_name
from medpipe.data.splits import split_patients
from medpipe.errors import SourceError
from medpipe.io import sha256_file, write_text_atomic

_log = logging.getLogger(__name__)

Format = Literal["nnunet", "msd", "csv"]
FORMATS: tuple[str, ...] = ("nnunet", "msd", "csv")
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass
class Case:
    """One case of a source dataset: a file per channel (or one 4D file) and an optional label map."""

    case_id: str
    patient_id: str
    images: list[Path]  # one per channel; or a single 4D file (MSD) holding every channel
    label: Path | None


@dataclass
class Source:
    """What a dataset folder / CSV declares: its cases, channel names and label names."""

    format: str
    path: Path
    cases: list[Case]
    channels: list[str]
    label_names: dict[int, str] | None  # None: not declared (every value found is accepted)
    description: str = ""
    declaration: Path | None = None  # dataset.json / the CSV (its sha256 goes in import.json)
    notes: list[str] = field(default_factory=list)


def _ending(name: str) -> str | None:
    return next((e for e in NIFTI_ENDINGS if name.endswith(e)), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: not found", hint="give the dataset folder that holds dataset.json") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return doc


def _channel_names(path: Path, declared: Any, key: str) -> list[str]:
    if not isinstance(declared, dict) or not declared:
        raise SourceError(f"{path}: {key} must map channel indices to names, e.g. {{\"0\": \"FLAIR\"}}")
    try:
        pairs = sorted((int(k), str(v)) for k, v in declared.items())
    except ValueError:
        raise SourceError(f"{path}: {key} keys must be channel indices 0, 1, ...") from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise SourceError(f"{path}: {key} must number the channels 0..{len(pairs) - 1}")
    names = [re.sub(r"[^A-Za-z0-9_-]+", "_", n).strip("_") or f"ch{i}" for i, n in pairs]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def read_nnunet(src: Path) -> Source:
    """An nnU-Net v2 raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).

    Raises:
        SourceError: the folder or ``dataset.json`` does not follow the layout (one line naming what).
    """
    src = src.expanduser().resolve()
    dj = src / "dataset.json"
    doc = _read_json(dj)
    channels = _channel_names(dj, doc.get("channel_names", doc.get("modality")), "channel_names")
    ending = str(doc.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_ENDINGS:
        raise SourceError(f"{dj}: file_ending {ending!r}: medpipe imports NIfTI (.nii.gz / .nii) nnU-Net datasets")
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise SourceError(f"{dj}: labels must map names to values, e.g. {{\"background\": 0, \"tumour\": 1}}")
    names: dict[int, str] = {}
    notes: list[str] = []
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise SourceError(f"{dj}: labels[{name!r}] must be a non-negative integer (or a list of them)")
        if isinstance(value, list):
            notes.append(f"region {name!r} = labels {value}: imported as the individual label values")
            for v in values:
                names.setdefault(int(v), f"label {v}")
        else:
            names[int(value)] = str(name)
    images_dir, labels_dir = src / "imagesTr", src / "labelsTr"
    if not images_dir.is_dir():
        raise SourceError(f"{src}: no imagesTr folder; an nnU-Net raw dataset has imagesTr/<case>_0000{ending}")
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        m = re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), f.name)
        if m is None:
            raise SourceError(f"{f}: not named <case>_<XXXX>{ending} (XXXX: the 4-digit channel index)")
        found.setdefault(m.group(1), {})[int(m.group(2))] = f
    if not found:
        raise SourceError(f"{images_dir}: no {ending} images")
    cases: list[Case] = []
    for case_id, files in sorted(found.items()):
        extra = sorted(set(files) - set(range(len(channels))))
        if extra:
            raise SourceError(f"{images_dir}: case {case_id} has channel file(s) {extra} but dataset.json declares "
                              f"{len(channels)} channel(s)")
        label = labels_dir / f"{case_id}{ending}"
        # a missing channel file makes the case fail its check (skipped, with the path), not the import
        images = [files.get(i, images_dir / f"{case_id}_{i:04d}{ending}") for i in range(len(channels))]
        cases.append(Case(case_id, case_id, images, label if label.is_file() else None))
    return Source("nnunet", src, cases, channels, names, str(doc.get("name") or doc.get("description") or ""), dj,
                  notes)


def read_msd(src: Path) -> Source:
    """A Medical Segmentation Decathlon task folder (``dataset.json`` with ``modality``, ``labels``, ``training``).

    Raises:
        SourceError: the folder or ``dataset.json`` does not follow the layout.
    """
    src = src.expanduser().resolve()
    dj = src / "dataset.json"
    doc = _read_json(dj)
    channels = _channel_names(dj, doc.get("modality"), "modality")
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise SourceError(f"{dj}: labels must map values to names, e.g. {{\"0\": \"background\", \"1\": \"tumour\"}}")
    try:
        names = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise SourceError(f"{dj}: labels keys must be label values (\"0\", \"1\", ...)") from None
    training = doc.get("training")
    if not isinstance(training, list) or not training:
        raise SourceError(f"{dj}: training must list {{\"image\": ..., \"label\": ...}} pairs")
    cases: list[Case] = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise SourceError(f"{dj}: training[{i}] needs an \"image\" path")
        image = (src / entry["image"]).resolve()
        label = (src / entry["label"]).resolve() if isinstance(entry.get("label"), str) else None
        stem = image.name
        for e in NIFTI_ENDINGS:
            stem = stem.removesuffix(e)
        cases.append(Case(stem, stem, [image], label))
    return Source("msd", src, cases, channels, names, str(doc.get("name") or ""), dj)


def read_csv_cases(path: Path, label_names: dict[int, str] | None = None) -> Source:
    """A CSV of cases: ``case_id``, optional ``patient_id`` and ``label``, one column per channel.

    Raises:
        SourceError: no header, no ``case_id`` or channel column, an empty cell, a repeated case id.
    """
    path = path.expanduser().resolve()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = [c.strip() for c in (reader.fieldnames or [])]
    except FileNotFoundError:
        raise SourceError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: cannot be read as CSV ({exc})") from exc
    key = "case_id" if "case_id" in columns else "case" if "case" in columns else None
    if key is None:
        raise SourceError(f"{path}: needs a case_id column (columns: {', '.join(columns) or 'none'})",
                          hint="columns: case_id, [patient_id], one per channel (e.g. FLAIR, T1c), [label]")
    channel_cols = [c for c in columns if c not in (key, "patient_id", "label")]
    if not channel_cols:
        raise SourceError(f"{path}: no channel column besides {key}, patient_id and label")
    channels = _channel_names(path, {str(i): c.removeprefix("image_") for i, c in enumerate(channel_cols)},
                              "channel columns")
    folder = path.parent
    cases: list[Case] = []
    seen: set[str] = set()
    for n, raw in enumerate(rows, start=2):
        row = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        case_id = row.get(key, "")
        if not case_id:
            raise SourceError(f"{path} line {n}: empty {key}")
        if case_id in seen:
            raise SourceError(f"{path} line {n}: case {case_id!r} is listed twice")
        seen.add(case_id)
        empty = [c for c in channel_cols if not row.get(c)]
        if empty:
            raise SourceError(f"{path} line {n} (case {case_id}): no path in column(s) {', '.join(empty)}")
        images = [Path(row[c]) if Path(row[c]).is_absolute() else (folder / row[c]).resolve() for c in channel_cols]
        label_text = row.get("label", "")
        label = None if not label_text else Path(label_text) if Path(label_text).is_absolute() else \
            (folder / label_text).resolve()
        cases.append(Case(case_id, row.get("patient_id") or case_id, images, label))
    if not cases:
        raise SourceError(f"{path}: no cases (only a header)")
    names = None if label_names is None else {0: label_names.get(0, "background"), **dict(label_names)}
    return Source("csv", path, cases, channels, names, path.stem, path)


def read_source(fmt: str, src: Path | str, *, label_names: dict[int, str] | None = None) -> Source:
    """Read a dataset of format ``nnunet`` / ``msd`` (a folder) or ``csv`` (a file).

    ``label_names`` (label value -> name) replaces the declared names (``csv``: declares them).
    """
    path = Path(src).expanduser()
    if fmt == "csv":
        source = read_csv_cases(path, label_names)
    elif fmt in ("nnunet", "msd"):
        if not path.is_dir():
            raise SourceError(f"{path}: not a folder; an {fmt} dataset is a folder with dataset.json")
        source = read_nnunet(path) if fmt == "nnunet" else read_msd(path)
        if label_names is not None:
            source.label_names = {0: label_names.get(0, "background"), **dict(label_names)}
    else:
        raise SourceError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    return source


# -- checking and building the items ------------------------------------------------------------------------


class CaseSkipped(Exception):
    """A case that fails a check; the message is the one-line reason."""


@dataclass
class BuiltCases:
    items: list[dict[str, Any]]
    skipped: list[dict[str, str]]  # {case_id, reason}
    resampled: list[str]  # "<case>: <channel or label> resampled onto the <reference> grid"
    found_labels: set[int]


def _load(path: Path, what: str) -> Any:
    import nibabel as nib

    if not path.is_file():
        raise CaseSkipped(f"{what} {path} does not exist")
    if _ending(path.name) is None:
        raise CaseSkipped(f"{what} {path} is not a NIfTI file (.nii.gz / .nii)")
    try:
        return nib.load(str(path))
    except Exception as exc:  # any unreadable file: this case only
        raise CaseSkipped(f"{what} {path} cannot be read ({type(exc).__name__}: {exc})") from None


def _grid_of(img: Any, path: Path, what: str) -> Any:
    from medpipe.data.volumes import GridSpec

    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise CaseSkipped(f"{what} {path} has shape {tuple(img.shape)}; expected a 3D volume")
    return GridSpec(cast(tuple[int, int, int], shape), np.asarray(img.affine, dtype=np.float64))


def _data3d(img: Any) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    return data


class _CaseBuilder:
    def __init__(self, source: Source, out: Path, reference: str, log: logging.Logger) -> None:
        self.source, self.out, self.reference, self.log = source, out, reference, log
        self.ref_index = source.channels.index(reference)
        self.resampled: list[str] = []
        self.found_labels: set[int] = set()

    def _target(self, case: Case, what: str, key: str) -> Path:
        return self.out / "images" / safe_name(case.case_id) / f"{safe_name(case.case_id)}_{what}_{key}.nii.gz"

    def _split_4d(self, case: Case) -> list[Path]:
        """An MSD 4D image -> one 3D file per channel under OUT/images (reused when already written)."""
        from medpipe.data.volumes import file_key, write_nifti

        path = case.images[0]
        img = _load(path, "image")
        n = len(self.source.channels)
        shape = tuple(int(s) for s in img.shape)
        if n == 1 and len(shape) in (2, 3):
            return [path]
        if len(shape) != 4 or shape[3] != n:
            raise CaseSkipped(f"image {path} has shape {shape}; dataset.json declares {n} channel(s) "
                              f"(expected (x, y, z, {n}))")
        key = file_key(path)
        targets = [self._target(case, name, key) for name in self.source.channels]
        if not all(t.is_file() for t in targets):
            data = np.asanyarray(img.dataobj)
            for c, t in enumerate(targets):
                if not t.is_file():
                    write_nifti(np.ascontiguousarray(data[..., c]), np.asarray(img.affine), t)
        return targets

    def build(self, case: Case) -> dict[str, Any]:
        from medpipe.data.volumes import file_key, label_dtype, resample_to_grid, write_nifti

        images = self._split_4d(case) if self.source.format == "msd" else list(case.images)
        if len(images) != len(self.source.channels):
            raise CaseSkipped(f"{len(images)} image file(s) for {len(self.source.channels)} channel(s)")
        imgs = [_load(p, f"channel {name} image") for p, name in zip(images, self.source.channels, strict=True)]
        grids = [_grid_of(img, p, f"channel {name} image")
                 for img, p, name in zip(imgs, images, self.source.channels, strict=True)]
        ref_grid = grids[self.ref_index]
        paths: list[str] = []
        for name, p, img, grid in zip(self.source.channels, images, imgs, grids, strict=True):
            if grid.same_as(ref_grid):
                paths.append(str(p))
                continue
            target = self._target(case, name, file_key(p, images[self.ref_index]))
            if not target.is_file():
                data = resample_to_grid(_data3d(img).astype(np.float32), grid.affine, ref_grid, order=1, cval=np.nan)
                if np.isnan(data).all():
                    raise CaseSkipped(f"channel {name} does not overlap the {self.reference} image in world space "
                                      "(check its affine)")
                data = np.nan_to_num(data, nan=float(np.nanmin(data)))
                write_nifti(data, ref_grid.affine, target)
            self.resampled.append(f"{case.case_id}: {name} resampled onto the {self.reference} grid (trilinear)")
            self.log.info("case %s: channel %s is on another grid (shape %s) and was resampled onto the %s grid "
                          "(shape %s)", case.case_id, name, grid.shape, self.reference, ref_grid.shape)
            paths.append(str(target))
        label_path: str | None = None
        foreground: bool | None = None
        if case.label is not None:
            limg = _load(case.label, "label map")
            lgrid = _grid_of(limg, case.label, "label map")
            data = _data3d(limg)
            if not np.issubdtype(data.dtype, np.integer):
                data = np.asarray(data, dtype=np.float64)
                if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                    raise CaseSkipped(f"label map {case.label} must hold integers")
            values = {int(v) for v in np.unique(data)}
            if min(values, default=0) < 0:
                raise CaseSkipped(f"label map {case.label} has negative values")
            declared = self.source.label_names
            if declared is not None:
                unknown = sorted(values - set(declared))
                if unknown:
                    raise CaseSkipped(f"label map {case.label} has value(s) {unknown} that are not declared labels "
                                      f"({', '.join(f'{k}={v}' for k, v in sorted(declared.items()))})")
            self.found_labels |= values
            foreground = any(v > 0 for v in values)
            if lgrid.same_as(ref_grid):
                label_path = str(case.label)
            else:
                target = self._target(case, "label", file_key(case.label, images[self.ref_index]))
                if not target.is_file():
                    lab = data.astype(label_dtype(max(values, default=0)))
                    write_nifti(resample_to_grid(lab, lgrid.affine, ref_grid, order=0), ref_grid.affine, target)
                self.resampled.append(f"{case.case_id}: label map resampled onto the {self.reference} grid "
                                      "(nearest neighbour)")
                self.log.info("case %s: the label map is on another grid and was resampled (nearest neighbour) onto "
                              "the %s grid", case.case_id, self.reference)
                label_path = str(target)
        return {"image": paths, "label": label_path, "class": None, "patient_id": case.patient_id,
                "study_uid": case.case_id, "case_id": case.case_id, "reference_volume": paths[self.ref_index],
                "has_foreground": foreground}


def build_cases(source: Source, out: Path, *, reference: str | None = None, log: logging.Logger | None = None,
                progress: Callable[[int], None] | None = None) -> BuiltCases:
    """Check every case of ``source`` and make its datalist item (derived files under ``out/images``).

    Raises:
        SourceError: ``reference`` is not one of the channels.
    """
    log = log or _log
    ref = reference or source.channels[0]
    if ref not in source.channels:
        raise SourceError(f"reference {ref!r} is not one of the channels {source.channels}")
    builder = _CaseBuilder(source, out, ref, log)
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for case in source.cases:
        try:
            items.append(builder.build(case))
        except CaseSkipped as exc:
            log.warning("case %s skipped: %s", case.case_id, exc)
            skipped.append({"case_id": case.case_id, "patient_id": case.patient_id, "reason": str(exc)})
        if progress is not None:
            progress(1)
    return BuiltCases(items, skipped, builder.resampled, builder.found_labels)


# -- the datalist -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiftiImport:
    """What :func:`import_nifti_dataset` wrote."""

    out: Path
    datalist: Path
    format: str
    channels: list[str]
    reference: str
    label_names: dict[int, str]
    counts: dict[str, int]  # split -> cases
    skipped: list[dict[str, str]]
    resampled: list[str]
    notes: list[str]


def import_nifti_dataset(fmt: str, src: Path | str, out: Path | str, *, reference: str | None = None,
                         label_names: dict[int, str] | None = None, val: float = 0.2, test: float = 0.2,
                         folds: int | None = None, fold: int = 0, seed: int = 0, stratify: bool = True,
                         relative_within: Path | None = None, log: logging.Logger | None = None,
                         progress: Callable[[int], None] | None = None) -> NiftiImport:
    """Read, check and split a NIfTI dataset into ``out/datalist.json`` (and ``out/import.json``).

    The split is by patient, stratified by label presence, deterministic from ``seed``
    (:func:`medpipe.data.splits.split_patients`; ``folds`` / ``fold`` as the ``dataset`` stage's split).
    Item paths inside ``relative_within`` (default ``out``) are written relative to the datalist.

    Raises:
        SourceError: the source cannot be read, or no case passes the checks.
        StageError: too few patients for the split.
    """
    out = Path(out).expanduser().resolve()
    source = read_source(fmt, src, label_names=label_names)
    built = build_cases(source, out, reference=reference, log=log, progress=progress)
    if not built.items:
        reasons = sorted({s["reason"] for s in built.skipped})[:3]
        raise SourceError(f"{source.path}: no usable case ({len(built.skipped)} skipped; e.g. {'; '.join(reasons)})")
    names = dict(source.label_names) if source.label_names is not None else \
        {v: ("background" if v == 0 else f"label {v}") for v in sorted(built.found_labels | {0})}
    strata: dict[str, int] = {}
    for it in built.items:
        strata[it["patient_id"]] = max(strata.get(it["patient_id"], 0), int(bool(it["has_foreground"])))
    split = split_patients(strata, val=val, test=test, seed=seed, stratify=stratify, folds=folds, fold=fold)
    where = {pid: name for name, pids in split.items() for pid in pids}
    ref = reference or source.channels[0]
    declared_sha = sha256_file(source.declaration) if source.declaration and source.declaration.is_file() else None
    doc: dict[str, Any] = {
        "channels": list(source.channels),
        "reference": ref,
        "channel_rules": None,
        "label_names": {str(k): v for k, v in sorted(names.items()) if k > 0},
        "class_names": None,
        **{s: [it for it in built.items if where[it["patient_id"]] == s] for s in ("train", "val", "test")},
        "skipped": built.skipped,
        "resampled": built.resampled,
        "split": {"val": val, "test": test, "seed": seed, "stratify": stratify, "folds": folds, "fold": fold,
                  "patients": split},
        "source": {"format": source.format, "path": str(source.path), "name": source.description,
                   "declaration_sha256": declared_sha},
    }
    datalist = out / "datalist.json"
    write_text_atomic(datalist, datalist_json(doc, datalist, relative_within=relative_within or out))
    counts = {s: len(doc[s]) for s in ("train", "val", "test")}
    write_text_atomic(out / "import.json", json.dumps({
        "format": source.format, "source": str(source.path), "declaration_sha256": declared_sha,
        "channels": source.channels, "reference": ref, "counts": counts, "skipped": len(built.skipped),
        "resampled": len(built.resampled), "notes": source.notes,
        "cases_sha1": hashlib.sha1("\n".join(sorted(c.case_id for c in source.cases)).encode()).hexdigest(),
    }, indent=1) + "\n")
    return NiftiImport(out, datalist, source.format, list(source.channels), ref,
                       {k: v for k, v in names.items() if k > 0}, counts, built.skipped, built.resampled, source.notes)
