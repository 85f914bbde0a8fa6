"""Datalist items from an ingest folder: channels on the reference grid, labels, a patient split.

Plain functions over an ingest output folder (``catalog.sqlite`` + volumes), no run context, so the
``dataset`` stage, ``predict`` and scoring share one code path:

* :func:`build_items`: an item per usable study of the folder (the others skipped with a one-line
  reason each), plus the checksums of what was read;
* :func:`build_study`: the item of one study (scoring calls it per study), or :class:`StudySkipped`;
* :func:`datalist_document` / :func:`write_datalist`: the items split by patient into ``datalist.json``.

Every channel (chosen by :mod:`medpipe.data.channels` rules) ends up on the **reference** channel's
grid: volumes whose shape or affine differ are resampled in world space (trilinear) into
``work_dir/images``; those already on it are used as they are (no copy). Volumes in different frames
of reference are never resampled onto each other.

**Labels** (one source, optional): :class:`SegLabels` the DICOM SEG of the catalog that references the
reference series, converted to an integer label map on the reference grid (segment number -> label
value, or ``segments: {number: value}``) in ``work_dir/labels``; :class:`NiftiLabels` a label map per
study (``{patient_id}``, ``{study_uid}``, ``{series_uid}`` in the pattern; resampled with nearest
neighbour when it is on another grid); :class:`CsvLabels` a class per study (``class`` in the items).

Outputs in ``work_dir`` are named by a hash of what produced them, so a re-run reuses them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medpipe.data.channels import Candidate, ChannelRule, StudySkipped, candidates, check_regex, select_channels
from medpipe.data.datalist import datalist_json, safe_name
from medpipe.data.splits import split_patients
from medpipe.errors import MedpipeError, StageError
from medpipe.io import sha256_file, write_text_atomic
from medpipe.stage import InputPath, ProgressFn, no_progress

if TYPE_CHECKING:
    from medpipe.catalog import CatalogReader
    from medpipe.data.volumes import GridSpec

_log = logging.getLogger(__name__)

# -- label sources ------------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegLabels(_Spec):
    source: Literal["seg"] = "seg"
    series_description: str | None = Field(default=None, description="regex choosing among several SEGs of a series")
    segments: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1, le=65535)]] | None = Field(default=None, description="segment number -> label value (default: the same)")
    required: bool = Field(default=True, description="skip studies without a SEG (else their label is null)")

    _regex = field_validator("series_description")(check_regex)


class NiftiLabels(_Spec):
    source: Literal["nifti"]
    pattern: str = Field(description="label map path; {patient_id}, {study_uid}, {series_uid} are filled in")
    required: bool = True

    @field_validator("pattern")
    @classmethod
    def _fields(cls, v: str) -> str:
        try:
            v.format(patient_id="p", study_uid="s", series_uid="r")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"pattern may use {{patient_id}}, {{study_uid}}, {{series_uid}} only ({exc})") from None
        return v


class CsvLabels(_Spec):
    source: Literal["csv"]
    path: InputPath | None = Field(default=None, description="CSV file; None: labels.csv of the sample stage's output")
    column: str = "has_tumor"
    key: Literal["auto", "study_uid", "patient_id"] = Field(
        default="auto", description="column joining rows to studies; auto: study_uid when the CSV has it")
    required: bool = True
    class_names: dict[int, str] | None = Field(default=None, description="class -> name (datalist class_names)")


class SrLabels(_Spec):
    source: Literal["sr"]
    series_description: str | None = Field(default=None, description="regex choosing among several SRs of a series")
    required: bool = Field(default=True, description="skip studies without an SR (else their findings are null)")

    _regex = field_validator("series_description")(check_regex)


LabelSpec = Annotated[SegLabels | NiftiLabels | CsvLabels | SrLabels, Field(discriminator="source")]
AnyLabels = SegLabels | NiftiLabels | CsvLabels | SrLabels


# -- results ------------------------------------------------------------------------------------------


@dataclass
class StudyItem:
    """The datalist item of one study, and whether its label map has a labelled voxel."""

    item: dict[str, Any]  # image (one path per channel), label, class, patient_id, study_uid, reference_*, series_uids
    foreground: bool | None  # None: no label map


@dataclass
class BuildResult:
    """The items of an ingest folder, the studies left out and what was read."""

    items: list[dict[str, Any]]
    skipped: list[dict[str, str]]  # {patient_id, study_uid, reason}, one line per study
    inputs: dict[str, str]  # input file -> sha256 (labels CSV, manifest.csv), for provenance
    label_names: dict[int, str] = field(default_factory=dict)  # label value -> SEG segment label
    label_codes: dict[int, dict[str, Any]] = field(default_factory=dict)  # label value -> SEG segment codes
    label_methods: dict[str, int] = field(default_factory=dict)  # how SEGs were placed -> number of studies
    n_resampled: int = 0  # channel volumes resampled onto their reference grid
    foreground: dict[tuple[str, str], bool] = field(default_factory=dict)  # (patient, study) -> labelled voxel
    n_volumes: int = 0  # volumes in the catalog
    n_bare: int = 0  # of them, volumes without patient, study or modality (ingested NIfTI files)

    def strata(self) -> dict[str, int]:
        """Patient -> stratum for the split: its class, or whether its label maps have a labelled voxel."""
        strata: dict[str, int] = {}
        for it in self.items:
            if it["class"] is not None:
                s = int(it["class"])
            elif it["label"] is not None:
                s = int(self.foreground.get((it["patient_id"], it["study_uid"]), False))
            elif it.get("findings") is not None:
                s = int(bool(it["findings"]))
            else:
                s = 0
            strata[it["patient_id"]] = max(strata.get(it["patient_id"], s), s)
        return strata

    def why_empty(self, ingest_dir: Path | str) -> str:
        """The one-line error for a result without items (with what to do when the folder holds NIfTI files)."""
        reasons = sorted({s["reason"] for s in self.skipped})[:3]
        text = (f"no usable study in {ingest_dir} ({len(self.skipped)} skipped"
                + (f"; e.g. {'; '.join(reasons)}" if reasons else
                   f"; its catalog lists {self.n_volumes} volume(s), none a usable 3D series") + ")")
        if self.n_bare and self.n_bare * 2 >= self.n_volumes:
            text += (f"; {self.n_bare} of its volumes came from NIfTI files, which carry no patient, study or series "
                     "description to pair channels by: import NIfTI datasets with `medpipe import nnunet|msd|csv` or "
                     "the dataset stage's source: {format: nnunet|msd|csv, path: ...}")
        return text


def study_tag(patient: str, study: str) -> str:
    """``<patient>/<study hash>``: the sub-folder of a study's resampled channels and label map."""
    return f"{safe_name(patient)}/{hashlib.sha1(study.encode()).hexdigest()[:8]}"


# -- the builder --------------------------------------------------------------------------------------


class DatalistBuilder:
    """Builds study items of one ingest folder; holds the catalog open (use it as a context manager).

    ``ingest_dir`` is used as given in the items' paths (pass an absolute path); resampled channels
    and label maps go under ``work_dir``. ``labels``: a :data:`LabelSpec` or None; a
    :class:`CsvLabels` needs its ``path`` set.

    Raises:
        CatalogError: ``ingest_dir`` has no readable catalog.
        StageError: the labels CSV cannot be read or lacks a column.
    """

    def __init__(self, ingest_dir: Path | str, rules: dict[str, ChannelRule], reference: str,
                 labels: AnyLabels | None = None, *, work_dir: Path | str,
                 log: logging.Logger | None = None) -> None:
        from medpipe.catalog import open_catalog

        if not rules:
            raise MedpipeError("channels: at least one channel is needed")
        if reference not in rules:
            raise MedpipeError(f"reference {reference!r} is not one of the channels {list(rules)}")
        self.ingest_dir = Path(ingest_dir)
        self.rules, self.reference, self.labels = rules, reference, labels
        self.work_dir = Path(work_dir)
        self.log = log or _log
        self.catalog: CatalogReader = open_catalog(self.ingest_dir)
        self.label_names: dict[int, str] = {}
        self.label_codes: dict[int, dict[str, Any]] = {}
        self.label_methods: dict[str, int] = defaultdict(int)
        self.n_resampled = 0
        self.inputs: dict[str, str] = {}
        self.csv_rows: dict[str, dict[str, str]] = {}
        self.csv_key = "study_uid"
        try:
            if isinstance(labels, CsvLabels):
                self._load_csv(labels)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- studies
    def studies(self) -> dict[tuple[str, str], list[Candidate]]:
        """The channel candidates (usable 3D volumes) of every study, by (patient_id, study_uid)."""
        return candidates(self.ingest_dir, self.catalog.volumes())

    def study(self, patient: str, study: str, cands: list[Candidate]) -> StudyItem:
        """The item of one study from its candidates.

        Raises:
            StudySkipped: the study cannot be used (one-line reason).
        """
        tag = study_tag(patient, study)
        chosen = select_channels(cands, self.rules)
        ref = chosen[self.reference]
        ref_grid, images = self._images(chosen, tag)
        if isinstance(self.labels, SrLabels):
            label, klass, foreground = None, None, None
        else:
            label, klass, foreground = self._label(ref, ref_grid, tag, patient, study)
        item = {
            "image": images, "label": label, "class": klass, "patient_id": patient, "study_uid": study,
            "reference_series_uid": ref.row.series_uid, "reference_volume": str(ref.path),
            "series_uids": {name: c.row.series_uid for name, c in chosen.items()},
        }
        if isinstance(self.labels, SrLabels):
            item["findings"], item["findings_source"] = self._sr(self.labels, ref)
        return StudyItem(item, foreground)

    def study_by_uid(self, study_uid: str, patient_id: str | None = None) -> StudyItem:
        """The item of the study ``study_uid`` (of ``patient_id`` when given).

        Raises:
            StudySkipped: no such study with a usable 3D volume, or it cannot be used (one-line reason).
        """
        groups = candidates(self.ingest_dir, self.catalog.volumes(study_uid=study_uid, patient_id=patient_id))
        if not groups:
            raise StudySkipped(f"study {study_uid} has no usable 3D volume in {self.ingest_dir}")
        if len(groups) > 1:
            raise StudySkipped(f"study {study_uid} is filed under several patient IDs "
                               f"({', '.join(repr(p) for p, _ in sorted(groups))}); give patient_id")
        ((patient, study), cands), = groups.items()
        return self.study(patient, study, cands)

    # -- images
    def _images(self, chosen: dict[str, Candidate], tag: str) -> tuple[GridSpec, list[str]]:
        import nibabel as nib

        from medpipe.data.volumes import file_key, read_grid, resample_to_grid, write_nifti

        ref = chosen[self.reference]
        ref_grid = read_grid(ref.path)
        paths = []
        for name, c in chosen.items():
            grid = read_grid(c.path)  # header only
            if grid.same_as(ref_grid):
                paths.append(str(c.path))
                continue
            for_ref, for_c = ref.sidecar.get("FrameOfReferenceUID"), c.sidecar.get("FrameOfReferenceUID")
            if for_ref and for_c and for_ref != for_c:
                raise StudySkipped(f"channel {name} is in another frame of reference than {self.reference}: "
                                   "cannot be put on its grid without registration")
            folder, stem = tag.split("/")
            target = self.work_dir / "images" / folder / f"{stem}_{name}_{file_key(c.path, ref.path)}.nii.gz"
            if not target.is_file():
                img = cast(nib.Nifti1Image, nib.load(str(c.path)))
                data = resample_to_grid(img.get_fdata(dtype=np.float32), img.affine, ref_grid, order=1)
                write_nifti(data, ref_grid.affine, target)
                self.log.info("%s: %s resampled onto the %s grid", tag, name, self.reference)
            self.n_resampled += 1
            paths.append(str(target))
        return ref_grid, paths

    # -- labels
    def _label(self, ref: Candidate, ref_grid: GridSpec, tag: str, patient: str, study: str
               ) -> tuple[str | None, int | None, bool | None]:
        """(label map, class, label map has a labelled voxel)."""
        spec = self.labels
        if spec is None:
            return None, None, None
        if isinstance(spec, SegLabels):
            return self._seg(spec, ref, ref_grid, tag)
        if isinstance(spec, NiftiLabels):
            return self._nifti(spec, ref, ref_grid, tag, patient, study)
        return None, self._class(spec, patient, study), None

    def _seg(self, spec: SegLabels, ref: Candidate, ref_grid: GridSpec, tag: str
             ) -> tuple[str | None, int | None, bool | None]:
        from medpipe.data.volumes import SegMismatch, file_key, read_seg, seg_to_labelmap, write_nifti

        series = ref.row.series_uid
        segs = [o for o in self.catalog.objects_referencing(series or "", modality="SEG")
                if spec.series_description is None or re.search(spec.series_description, o.series_description or "")]
        if not segs:
            if spec.required:
                raise StudySkipped(f"no DICOM SEG references the {self.reference} series {series}")
            return None, None, None
        if len(segs) > 1:
            raise StudySkipped(f"{len(segs)} DICOM SEGs reference the {self.reference} series: "
                               + ", ".join(repr(o.series_description) for o in segs)
                               + "; choose one with labels.series_description")
        obj = segs[0]
        seg_file = Path(obj.path)
        deps = [ref.path] + ([seg_file] if seg_file.is_file() else [])
        key = file_key(*deps, extra=(obj.path, obj.sop_uid, spec.segments))
        folder, stem = tag.split("/")
        target = self.work_dir / "labels" / folder / f"{stem}_label_{key}.nii.gz"
        meta = target.with_name(target.name.replace(".nii.gz", ".json"))
        if target.is_file() and meta.is_file():
            info = json.loads(meta.read_text(encoding="utf-8"))
        else:
            try:
                lm = seg_to_labelmap(read_seg(obj.path), ref_grid, ref.sidecar, spec.segments)
            except SegMismatch as exc:
                raise StudySkipped(f"SEG {obj.path}: {exc}") from None
            except (OSError, ValueError, AttributeError, KeyError) as exc:
                raise StudySkipped(f"SEG {obj.path} cannot be read: {type(exc).__name__}: {exc}") from None
            write_nifti(lm.data, ref_grid.affine, target)
            info = {"names": {str(k): v for k, v in lm.names.items()},
                    "codes": {str(k): v for k, v in lm.codes.items()}, "method": lm.method, "seg": obj.path,
                    "counts": {str(int(v)): int(c) for v, c in zip(*np.unique(lm.data, return_counts=True))}}
            write_text_atomic(meta, json.dumps(info, indent=1) + "\n")
        for k, v in info["names"].items():
            self.label_names.setdefault(int(k), v)
        for k, c in (info.get("codes") or {}).items():
            self.label_codes.setdefault(int(k), c)
        self.label_methods[info["method"]] += 1
        foreground = any(int(k) > 0 and c > 0 for k, c in info["counts"].items())
        return str(target), None, foreground

    def _nifti(self, spec: NiftiLabels, ref: Candidate, ref_grid: GridSpec, tag: str, patient: str, study: str
               ) -> tuple[str | None, int | None, bool | None]:
        import nibabel as nib

        from medpipe.data.volumes import file_key, label_dtype, read_grid, resample_to_grid, write_nifti

        path = Path(spec.pattern.format(patient_id=patient, study_uid=study, series_uid=ref.row.series_uid))
        path = path.expanduser().resolve()
        if not path.is_file():
            if spec.required:
                raise StudySkipped(f"no label map {path}")
            return None, None, None
        try:
            grid = read_grid(path)
            data = np.asanyarray(cast(nib.Nifti1Image, nib.load(str(path))).dataobj)
        except (OSError, ValueError) as exc:
            raise StudySkipped(f"label map {path} cannot be read: {exc}") from None
        if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data)):
            raise StudySkipped(f"label map {path} must hold non-negative integers")
        data = data.astype(label_dtype(int(data.max()) if data.size else 0))
        foreground = bool(data.any())
        if grid.same_as(ref_grid):
            return str(path), None, foreground
        folder, stem = tag.split("/")
        target = self.work_dir / "labels" / folder / f"{stem}_label_{file_key(path, ref.path)}.nii.gz"
        if not target.is_file():
            write_nifti(resample_to_grid(data, grid.affine, ref_grid, order=0), ref_grid.affine, target)
            self.log.info("%s: label map resampled (nearest neighbour) onto the %s grid", tag, self.reference)
        return str(target), None, foreground

    def _sr(self, spec: SrLabels, ref: Candidate) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The point findings of the SR that references the reference series: centres (LPS, mm) and diameters."""
        from medpipe.dicom.sr import read_findings_sr
        from medpipe.errors import DicomError

        series = ref.row.series_uid
        srs = [o for o in self.catalog.objects_referencing(series or "", modality="SR")
               if spec.series_description is None or re.search(spec.series_description, o.series_description or "")]
        if not srs:
            if spec.required:
                raise StudySkipped(f"no DICOM SR references the {self.reference} series {series}")
            return None, None
        if len(srs) > 1:
            raise StudySkipped(f"{len(srs)} DICOM SRs reference the {self.reference} series: "
                               + ", ".join(repr(o.series_description) for o in srs)
                               + "; choose one with labels.series_description")
        path = srs[0].path
        try:
            report = read_findings_sr(path)
        except (DicomError, OSError, ValueError, AttributeError, KeyError) as exc:
            raise StudySkipped(f"SR {path} cannot be read: {exc}") from None
        frame = ref.sidecar.get("FrameOfReferenceUID")
        if report.findings and frame and report.frame_of_reference_uid != frame:
            raise StudySkipped(f"SR {path}: its points are in frame of reference {report.frame_of_reference_uid}, "
                               f"the {self.reference} series in {frame}")
        out = []
        for f in report.findings:
            if f.diameter_mm is None:
                raise StudySkipped(f"SR {path}: finding {f.label!r} has no diameter; a box needs a size")
            out.append({"center_lps": [round(float(v), 4) for v in f.center], "diameter_mm": round(f.diameter_mm, 4),
                        "label": f.label})
        self.label_methods["SR points"] += 1
        return out, str(path)

    def _load_csv(self, spec: CsvLabels) -> None:
        if spec.path is None:
            raise StageError("labels.path: no labels CSV given")
        path = Path(spec.path).expanduser().resolve()
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise StageError(f"labels.path: cannot read {path} ({exc.strerror or exc})") from exc
        columns = list(rows[0]) if rows else []
        key = spec.key if spec.key != "auto" else ("study_uid" if "study_uid" in columns else "patient_id")
        for needed in (key, spec.column):
            if needed not in columns:
                raise StageError(f"labels: {path} has no column {needed!r} (columns: {', '.join(columns)})")
        self.csv_key = key
        self.csv_rows = {r[key]: r for r in rows}
        self.inputs[str(path)] = sha256_file(path)

    def _class(self, spec: CsvLabels, patient: str, study: str) -> int | None:
        row = self.csv_rows.get(study if self.csv_key == "study_uid" else patient)
        value = (row or {}).get(spec.column, "")
        if value is None or str(value).strip() == "":
            if spec.required:
                raise StudySkipped(f"no {spec.column!r} for this study in the labels CSV")
            return None
        try:
            number = float(value)
        except ValueError:
            raise StudySkipped(f"class {value!r} in column {spec.column!r} is not an integer") from None
        if number != int(number):
            raise StudySkipped(f"class {value!r} in column {spec.column!r} is not an integer")
        return int(number)


# -- the public functions -----------------------------------------------------------------------------


def build_items(ingest_dir: Path | str, rules: dict[str, ChannelRule], reference: str,
                labels: AnyLabels | None = None, *, work_dir: Path | str,
                log: logging.Logger | None = None, progress: ProgressFn = no_progress) -> BuildResult:
    """An item per usable study of an ingest folder, in (patient_id, study_uid) order.

    A study that cannot be used is logged (warning) and listed in ``skipped`` with its reason; an
    empty ``items`` is not an error here (:meth:`BuildResult.why_empty` words one).
    ``progress(description, total)``: a context manager yielding ``advance(n)`` (e.g. ``ctx.progress``).
    """
    log = log or _log
    with DatalistBuilder(ingest_dir, rules, reference, labels, work_dir=work_dir, log=log) as builder:
        volumes = builder.catalog.volumes()
        n_bare = sum(1 for v in volumes if not v.study_uid and not v.patient_id and not v.modality)
        studies = builder.studies()
        manifest = builder.ingest_dir / "manifest.csv"
        if manifest.is_file():
            builder.inputs[str(manifest)] = sha256_file(manifest)
        items: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        foreground: dict[tuple[str, str], bool] = {}
        with progress("Building the datalist", len(studies)) as advance:
            for (patient, study), cands in sorted(studies.items()):
                try:
                    built = builder.study(patient, study, cands)
                except StudySkipped as exc:
                    log.warning("study %s of patient %s skipped: %s", study, patient, exc)
                    skipped.append({"patient_id": patient, "study_uid": study, "reason": str(exc)})
                    advance(1)
                    continue
                items.append(built.item)
                if built.foreground is not None:
                    foreground[(patient, study)] = built.foreground
                advance(1)
        return BuildResult(items, skipped, builder.inputs, builder.label_names, builder.label_codes,
                           dict(builder.label_methods), builder.n_resampled, foreground, len(volumes), n_bare)


def build_study(ingest_dir: Path | str, study_uid: str, rules: dict[str, ChannelRule], reference: str,
                labels: AnyLabels | None = None, *, work_dir: Path | str,
                patient_id: str | None = None, log: logging.Logger | None = None) -> StudyItem:
    """The item of one study of an ingest folder (the same item :func:`build_items` makes for it).

    Raises:
        StudySkipped: the study is not there or cannot be used (one-line reason).
        CatalogError: ``ingest_dir`` has no readable catalog.
    """
    with DatalistBuilder(ingest_dir, rules, reference, labels, work_dir=work_dir, log=log) as builder:
        return builder.study_by_uid(study_uid, patient_id)


def datalist_document(result: BuildResult, *, channels: list[str], reference: str, ingest_dir: Path | str,
                      seed: int, val: float, test: float, stratify: bool = True, folds: int | None = None,
                      fold: int = 0, label_names: dict[int, str] | None = None,
                      class_names: dict[int, str] | None = None,
                      rules: dict[str, ChannelRule] | None = None) -> dict[str, Any]:
    """The ``datalist.json`` document: ``result``'s items split by patient (:func:`split_patients`).

    ``label_names``: None = the SEG segment labels found; ``label_codes`` (the SEG segments' SNOMED CT category
    and type per label value, which the segmenter's model package carries on) are written either way; ``class_names``: class -> name, or None;
    ``rules``: the channel rules that picked the series, recorded as ``channel_rules`` so a model trained
    on the datalist can pick the same series from new DICOM studies.

    Raises:
        StageError: too few patients for the split.
    """
    split = split_patients(result.strata(), val=val, test=test, seed=seed, stratify=stratify, folds=folds,
                           fold=fold)
    where = {pid: name for name, pids in split.items() for pid in pids}
    names = label_names if label_names is not None else result.label_names
    return {
        "channels": list(channels),
        "reference": reference,
        "channel_rules": {k: r.model_dump(exclude_none=True) for k, r in rules.items()} if rules else None,
        "label_names": {str(k): v for k, v in sorted(names.items())},
        "label_codes": {str(k): v for k, v in sorted(result.label_codes.items())} or None,
        "class_names": {str(k): v for k, v in sorted(class_names.items())} if class_names else None,
        "train": [it for it in result.items if where[it["patient_id"]] == "train"],
        "val": [it for it in result.items if where[it["patient_id"]] == "val"],
        "test": [it for it in result.items if where[it["patient_id"]] == "test"],
        "skipped": result.skipped,
        "split": {"val": val, "test": test, "seed": seed, "stratify": stratify, "folds": folds, "fold": fold,
                  "patients": split},
        "ingest_dir": str(ingest_dir),
    }


def write_datalist(path: Path | str, doc: dict[str, Any], *, relative_within: Path | None = None) -> None:
    """Write a datalist document (indented JSON), atomically; item paths inside ``relative_within`` (the run
    folder) are written relative to the datalist's folder (:func:`medpipe.data.datalist.datalist_json`)."""
    write_text_atomic(path, datalist_json(doc, Path(path), relative_within=relative_within))
