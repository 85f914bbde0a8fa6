"""Stage ``dataset``: the datalist (``datalist.json``) from an ingest catalog.

Per study (``StudyInstanceUID``), each input **channel** is the one ingested volume (status ``ok`` or
``warning``, 3D) that matches its rule on DICOM attributes, in the spirit of MONAI Deploy's series
selection rules::

    channels:
      T1:    {modality: MR, series_description: "(?i)^t1$"}
      T1c:   {modality: MR, series_description: "(?i)^t1c$|post|gd"}
      T2:    {modality: MR, series_description: "(?i)^t2$"}
      FLAIR: {modality: MR, series_description: "(?i)flair", min_slices: 20}
    reference: FLAIR

A rule may use ``modality`` (exact, case-insensitive), ``series_description``, ``protocol_name`` and
``image_type`` (regular expressions, ``re.search``; ``image_type`` is matched against the values
joined with ``\\``, e.g. ``ORIGINAL\\PRIMARY\\OTHER``) and ``min_slices``. A study where a channel
matches no volume or several, or one volume matches several channels, is skipped with the reason
(logged, listed under ``skipped`` in the datalist and counted in ``n_skipped``).

Every channel ends up on the **reference** channel's grid: volumes whose shape or affine differ are
resampled in world space (trilinear) into this stage's folder; those already on it are used as they
are (no copy). Volumes in different frames of reference are never resampled onto each other.

**Labels** (one source): ``{source: seg}`` the DICOM SEG of the catalog's ``objects`` table that
references the reference series, converted to an integer label map on the reference grid (segment
number -> label value, or ``segments: {number: value}``); ``{source: nifti, pattern: ...}`` a label
map per study (``{patient_id}``, ``{study_uid}``, ``{series_uid}`` in the pattern; resampled with
nearest neighbour when it is on another grid); ``{source: csv, path, column}`` a class per study
(``class`` in the items); or ``labels: null``.

**Split** by patient (a patient's studies never end up in two splits), stratified by class / by
"has a non-empty label map", deterministic from ``split.seed`` (default: the run's seed); with
``split.folds: k`` and ``split.fold: i`` the patients outside the test split are divided into k
folds and fold i is the validation split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import numpy as np
from pydantic import Field, field_validator, model_validator

from medpipe.data.datalist import safe_name
from medpipe.data.splits import split_patients
from medpipe.errors import StageError
from medpipe.io import sha256_file, write_text_atomic
from medpipe.stage import Need, RunContext, StageParams, StageResult, stage

# -- parameters ---------------------------------------------------------------------------------------


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from None
    return value


class ChannelRule(StageParams):
    """Which series is a channel: every given condition must hold."""

    modality: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    image_type: str | None = None
    min_slices: int | None = Field(default=None, ge=1)

    _regex = field_validator("series_description", "protocol_name", "image_type")(_check_regex)

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.model_dump(exclude_none=True).items()]
        return ", ".join(parts) or "any series"


DEFAULT_CHANNELS: dict[str, ChannelRule] = {
    "T1": ChannelRule(modality="MR", series_description=r"(?i)^t1$"),
    "T1c": ChannelRule(modality="MR", series_description=r"(?i)^t1c$|post|gd"),
    "T2": ChannelRule(modality="MR", series_description=r"(?i)^t2$"),
    "FLAIR": ChannelRule(modality="MR", series_description=r"(?i)flair"),
}


class SegLabels(StageParams):
    source: Literal["seg"] = "seg"
    series_description: str | None = Field(default=None, description="regex choosing among several SEGs of a series")
    segments: dict[int, int] | None = Field(default=None, description="segment number -> label value (default: the same)")
    required: bool = Field(default=True, description="skip studies without a SEG (else their label is null)")

    _regex = field_validator("series_description")(_check_regex)


class NiftiLabels(StageParams):
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


class CsvLabels(StageParams):
    source: Literal["csv"]
    path: str | None = Field(default=None, description="CSV file; None: labels.csv of the sample stage's output")
    column: str = "has_tumor"
    key: Literal["auto", "study_uid", "patient_id"] = Field(
        default="auto", description="column joining rows to studies; auto: study_uid when the CSV has it")
    required: bool = True
    class_names: dict[int, str] | None = Field(default=None, description="class -> name (datalist class_names)")


LabelSpec = Annotated[SegLabels | NiftiLabels | CsvLabels, Field(discriminator="source")]


class SplitParams(StageParams):
    val: float = Field(default=0.2, ge=0.0, lt=1.0)
    test: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int | None = Field(default=None, description="None: the run's seed")
    stratify: bool = Field(default=True, description="keep class / empty-label proportions in every split")
    folds: int | None = Field(default=None, ge=2, description="k-fold over the non-test patients (val is then ignored)")
    fold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SplitParams:
        if self.folds is None and self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be below 1 (got {self.val} + {self.test})")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold must be between 0 and folds - 1 = {self.folds - 1}, got {self.fold}")
        return self


class DatasetParams(StageParams):
    ingest_dir: str | None = Field(default=None, description="None: the ingest stage's output")
    channels: dict[str, ChannelRule] = Field(default_factory=lambda: dict(DEFAULT_CHANNELS))
    reference: str = Field(default="FLAIR", description="channel whose grid every channel and label is put on")
    labels: LabelSpec | None = Field(default_factory=lambda: SegLabels())
    label_names: dict[int, str] | None = Field(default=None, description="label value -> name; default: SEG segment labels")
    split: SplitParams = Field(default_factory=lambda: SplitParams())

    @model_validator(mode="after")
    def _check(self) -> DatasetParams:
        if not self.channels:
            raise ValueError("channels: at least one channel is needed")
        bad = [c for c in self.channels if not re.fullmatch(r"[A-Za-z0-9_-]+", c)]
        if bad:
            raise ValueError(f"channel names may use letters, digits, '_' and '-' only: {bad}")
        if self.reference not in self.channels:
            raise ValueError(f"reference {self.reference!r} is not one of the channels {list(self.channels)}")
        return self


# -- the catalog -------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One ingested volume that may become a channel."""

    row: dict[str, Any]
    sidecar: dict[str, Any]
    path: Path
    n_slices: int

    @property
    def label(self) -> str:
        r = self.row
        return f"series {r['series_number']} {r['series_description']!r}" + (f" [{r['part']}]" if r["part"] else "")

    def matches(self, rule: ChannelRule) -> bool:
        r, s = self.row, self.sidecar
        if rule.modality is not None and str(r["modality"] or "").upper() != rule.modality.upper():
            return False
        if rule.series_description is not None and not re.search(rule.series_description, r["series_description"] or ""):
            return False
        if rule.protocol_name is not None and not re.search(rule.protocol_name, str(s.get("ProtocolName") or "")):
            return False
        if rule.image_type is not None:
            value = s.get("ImageType") or []
            text = "\\".join(value) if isinstance(value, list) else str(value)
            if not re.search(rule.image_type, text):
                return False
        return rule.min_slices is None or self.n_slices >= rule.min_slices


def _read_catalog(ingest_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(volumes, objects)`` rows of ``catalog.sqlite``, opened read-only."""
    path = ingest_dir / "catalog.sqlite"
    if not path.is_file():
        raise StageError(f"{ingest_dir} has no catalog.sqlite: run the ingest stage (or 'medpipe ingest') first")
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:  # pragma: no cover - e.g. a read-only WAL database without its -shm file
        db = sqlite3.connect(path)
    try:
        out = []
        for sql in ("SELECT * FROM volumes ORDER BY patient_id, study_uid, series_number, series_uid, part",
                    "SELECT * FROM objects ORDER BY patient_id, study_uid, path"):
            cur = db.execute(sql)
            cols = [c[0] for c in cur.description]
            out.append([dict(zip(cols, r, strict=True)) for r in cur])
    except sqlite3.Error as exc:
        raise StageError(f"{path}: cannot read the ingest catalog ({exc}); re-run the ingest stage") from exc
    finally:
        db.close()
    return out[0], out[1]


def _candidates(ingest_dir: Path, volumes: list[dict[str, Any]]) -> dict[tuple[str, str], list[Candidate]]:
    """Usable 3D volumes grouped by (patient_id, study_uid)."""
    studies: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for row in volumes:
        if row["status"] not in ("ok", "warning") or not row["volume"] or not row["study_uid"]:
            continue
        shape = [int(s) for s in str(row["shape"]).split("x") if s]
        if len(shape) != 3:
            continue  # 2D images and 4D series are not channels
        sidecar: dict[str, Any] = {}
        if row["sidecar"]:
            try:
                sidecar = json.loads((ingest_dir / row["sidecar"]).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                sidecar = {}
        studies[(row["patient_id"] or "", row["study_uid"])].append(
            Candidate(row, sidecar, ingest_dir / row["volume"], shape[2]))
    return studies


# -- the stage ----------------------------------------------------------------------------------------


class Skip(Exception):
    """This study cannot be used (one-line reason)."""




def _select(cands: list[Candidate], channels: dict[str, ChannelRule]) -> dict[str, Candidate]:
    chosen: dict[str, Candidate] = {}
    for name, rule in channels.items():
        hits = [c for c in cands if c.matches(rule)]
        if not hits:
            raise Skip(f"no series matches channel {name} ({rule.describe()})")
        if len(hits) > 1:
            raise Skip(f"{len(hits)} series match channel {name} ({rule.describe()}): "
                       + ", ".join(c.label for c in hits) + "; make the rule stricter")
        chosen[name] = hits[0]
    used: dict[str, list[str]] = defaultdict(list)
    for name, c in chosen.items():
        used[c.row["stack_id"]].append(name)
    for names in used.values():
        if len(names) > 1:
            raise Skip(f"one series matches channels {' and '.join(names)} ({chosen[names[0]].label})")
    return chosen


class _Builder:
    """Builds the items of one dataset stage run."""

    def __init__(self, ctx: RunContext, p: DatasetParams, ingest_dir: Path, objects: list[dict[str, Any]]) -> None:
        self.ctx, self.p, self.ingest_dir, self.objects = ctx, p, ingest_dir, objects
        self.names: dict[int, str] = {}
        self.methods: dict[str, int] = defaultdict(int)
        self.n_resampled = 0
        self.inputs: dict[str, str] = {}
        self.csv_rows: dict[str, dict[str, str]] | None = None
        self.csv_key = "study_uid"
        self.foreground: dict[str, bool] = {}  # study tag -> label map has a labelled voxel
        self.ref_grid: Any = None
        labels = p.labels
        if isinstance(labels, CsvLabels):
            self._load_csv(labels)

    # -- images
    def images(self, chosen: dict[str, Candidate], tag: str) -> list[str]:
        from medpipe.data.volumes import (
            file_key,
            read_grid,
            resample_to_grid,
            write_nifti,
        )

        ref = chosen[self.p.reference]
        self.ref_grid = read_grid(ref.path)
        paths = []
        for name, c in chosen.items():
            grid = read_grid(c.path)  # header only
            if grid.same_as(self.ref_grid):
                paths.append(str(c.path))
                continue
            for_ref, for_c = ref.sidecar.get("FrameOfReferenceUID"), c.sidecar.get("FrameOfReferenceUID")
            if for_ref and for_c and for_ref != for_c:
                raise Skip(f"channel {name} is in another frame of reference than {self.p.reference}: "
                           "cannot be put on its grid without registration")
            import nibabel as nib

            target = self.ctx.stage_dir / "images" / tag.split("/")[0] / (
                f"{tag.split('/')[1]}_{name}_{file_key(c.path, ref.path)}.nii.gz")
            if not target.is_file():
                img = cast(nib.Nifti1Image, nib.load(str(c.path)))
                data = resample_to_grid(img.get_fdata(dtype=np.float32), img.affine, self.ref_grid, order=1)
                write_nifti(data, self.ref_grid.affine, target)
                self.ctx.log.info("%s: %s resampled onto the %s grid", tag, name, self.p.reference)
            self.n_resampled += 1
            paths.append(str(target))
        return paths

    # -- labels
    def label(self, chosen: dict[str, Candidate], tag: str, patient: str, study: str) -> tuple[str | None, int | None]:
        spec = self.p.labels
        if spec is None:
            return None, None
        if isinstance(spec, SegLabels):
            return self._seg(spec, chosen[self.p.reference], tag), None
        if isinstance(spec, NiftiLabels):
            return self._nifti(spec, chosen[self.p.reference], tag, patient, study), None
        return None, self._class(spec, patient, study)

    def _seg(self, spec: SegLabels, ref: Candidate, tag: str) -> str | None:
        from medpipe.data.volumes import (
            SegMismatch,
            file_key,
            read_seg,
            seg_to_labelmap,
            write_nifti,
        )

        series = ref.row["series_uid"]
        segs = [o for o in self.objects if o["modality"] == "SEG" and series in (o["referenced_series"] or "").split("\\")
                and (spec.series_description is None or re.search(spec.series_description, o["series_description"] or ""))]
        if not segs:
            if spec.required:
                raise Skip(f"no DICOM SEG references the {self.p.reference} series {series}")
            return None
        if len(segs) > 1:
            raise Skip(f"{len(segs)} DICOM SEGs reference the {self.p.reference} series: "
                       + ", ".join(repr(o["series_description"]) for o in segs)
                       + "; choose one with labels.series_description")
        obj = segs[0]
        seg_file = Path(obj["path"])
        deps = [ref.path] + ([seg_file] if seg_file.is_file() else [])
        key = file_key(*deps, extra=(obj["path"], obj["sop_uid"], spec.segments))
        target = self.ctx.stage_dir / "labels" / tag.split("/")[0] / f"{tag.split('/')[1]}_label_{key}.nii.gz"
        meta = target.with_name(target.name.replace(".nii.gz", ".json"))
        if target.is_file() and meta.is_file():
            info = json.loads(meta.read_text(encoding="utf-8"))
        else:
            try:
                lm = seg_to_labelmap(read_seg(obj["path"]), self.ref_grid, ref.sidecar, spec.segments)
            except SegMismatch as exc:
                raise Skip(f"SEG {obj['path']}: {exc}") from None
            except (OSError, ValueError, AttributeError, KeyError) as exc:
                raise Skip(f"SEG {obj['path']} cannot be read: {type(exc).__name__}: {exc}") from None
            write_nifti(lm.data, self.ref_grid.affine, target)
            info = {"names": {str(k): v for k, v in lm.names.items()}, "method": lm.method, "seg": obj["path"],
                    "counts": {str(int(v)): int(c) for v, c in zip(*np.unique(lm.data, return_counts=True))}}
            write_text_atomic(meta, json.dumps(info, indent=1) + "\n")
        for k, v in info["names"].items():
            self.names.setdefault(int(k), v)
        self.methods[info["method"]] += 1
        self.foreground[tag] = any(int(k) > 0 and c > 0 for k, c in info["counts"].items())
        return str(target)

    def _nifti(self, spec: NiftiLabels, ref: Candidate, tag: str, patient: str, study: str) -> str | None:
        import nibabel as nib

        from medpipe.data.volumes import (
            file_key,
            label_dtype,
            read_grid,
            resample_to_grid,
            write_nifti,
        )

        path = Path(spec.pattern.format(patient_id=patient, study_uid=study, series_uid=ref.row["series_uid"]))
        path = path.expanduser().resolve()
        if not path.is_file():
            if spec.required:
                raise Skip(f"no label map {path}")
            return None
        try:
            grid = read_grid(path)
            data = np.asanyarray(cast(nib.Nifti1Image, nib.load(str(path))).dataobj)
        except (OSError, ValueError) as exc:
            raise Skip(f"label map {path} cannot be read: {exc}") from None
        if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data)):
            raise Skip(f"label map {path} must hold non-negative integers")
        data = data.astype(label_dtype(int(data.max()) if data.size else 0))
        self.foreground[tag] = bool(data.any())
        if grid.same_as(self.ref_grid):
            return str(path)
        target = self.ctx.stage_dir / "labels" / tag.split("/")[0] / f"{tag.split('/')[1]}_label_{file_key(path, ref.path)}.nii.gz"
        if not target.is_file():
            write_nifti(resample_to_grid(data, grid.affine, self.ref_grid, order=0), self.ref_grid.affine, target)
            self.ctx.log.info("%s: label map resampled (nearest neighbour) onto the %s grid", tag, self.p.reference)
        return str(target)

    def _load_csv(self, spec: CsvLabels) -> None:
        if spec.path is not None:
            path = Path(spec.path).expanduser().resolve()
        else:
            path = self.ctx.input("sample_dir", None, "labels.path") / "labels.csv"
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
        assert self.csv_rows is not None
        row = self.csv_rows.get(study if self.csv_key == "study_uid" else patient)
        value = (row or {}).get(spec.column, "")
        if value is None or str(value).strip() == "":
            if spec.required:
                raise Skip(f"no {spec.column!r} for this study in the labels CSV")
            return None
        try:
            number = float(value)
        except ValueError:
            raise Skip(f"class {value!r} in column {spec.column!r} is not an integer") from None
        if number != int(number):
            raise Skip(f"class {value!r} in column {spec.column!r} is not an integer")
        return int(number)


@stage("dataset", DatasetParams, needs=(Need("ingest_dir", params=("ingest_dir",)), Need("sample_dir", optional=True)),
       gives=("datalist",))
def dataset(ctx: RunContext, p: DatasetParams) -> StageResult:
    ingest_dir = ctx.input("ingest_dir", p.ingest_dir)
    volumes, objects = _read_catalog(ingest_dir)
    studies = _candidates(ingest_dir, volumes)
    builder = _Builder(ctx, p, ingest_dir, objects)
    manifest = ingest_dir / "manifest.csv"
    if manifest.is_file():
        builder.inputs[str(manifest)] = sha256_file(manifest)

    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with ctx.progress("Building the datalist", len(studies)) as advance:
        for (patient, study), cands in sorted(studies.items()):
            tag = _tag(patient, study)
            try:
                chosen = _select(cands, p.channels)
                images = builder.images(chosen, tag)
                label, klass = builder.label(chosen, tag, patient, study)
            except Skip as exc:
                ctx.log.warning("study %s of patient %s skipped: %s", study, patient, exc)
                skipped.append({"patient_id": patient, "study_uid": study, "reason": str(exc)})
                advance(1)
                continue
            ref = chosen[p.reference]
            items.append({
                "image": images, "label": label, "class": klass, "patient_id": patient, "study_uid": study,
                "reference_series_uid": ref.row["series_uid"], "reference_volume": str(ref.path),
                "series_uids": {name: c.row["series_uid"] for name, c in chosen.items()},
            })
            advance(1)
    if not items:
        reasons = sorted({s["reason"] for s in skipped})[:3]
        raise StageError(f"no usable study in {ingest_dir} ({len(skipped)} skipped"
                         + (f"; e.g. {'; '.join(reasons)}" if reasons else "") + ")")

    # one stratum per patient: its class, or whether it has any labelled voxel
    strata: dict[str, int] = {}
    for it in items:
        if it["class"] is not None:
            s = int(it["class"])
        elif it["label"] is not None:
            s = int(builder.foreground.get(_tag(it["patient_id"], it["study_uid"]), False))
        else:
            s = 0
        strata[it["patient_id"]] = max(strata.get(it["patient_id"], s), s)
    sp = p.split
    seed = ctx.seed if sp.seed is None else sp.seed
    split = split_patients(strata, val=sp.val, test=sp.test, seed=seed, stratify=sp.stratify,
                           folds=sp.folds, fold=sp.fold)
    where = {pid: name for name, pids in split.items() for pid in pids}
    label_names = p.label_names if p.label_names is not None else builder.names
    doc: dict[str, Any] = {
        "channels": list(p.channels),
        "reference": p.reference,
        "label_names": {str(k): v for k, v in sorted(label_names.items())},
        "class_names": {str(k): v for k, v in sorted(p.labels.class_names.items())}
        if isinstance(p.labels, CsvLabels) and p.labels.class_names else None,
        "train": [it for it in items if where[it["patient_id"]] == "train"],
        "val": [it for it in items if where[it["patient_id"]] == "val"],
        "test": [it for it in items if where[it["patient_id"]] == "test"],
        "skipped": skipped,
        "split": {**sp.model_dump(), "seed": seed, "patients": split},
        "ingest_dir": str(ingest_dir),
    }
    path = ctx.stage_dir / "datalist.json"
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    metrics = {"n_train": len(doc["train"]), "n_val": len(doc["val"]), "n_test": len(doc["test"]),
               "n_skipped": len(skipped)}
    ctx.log.info("datalist: %d train, %d val, %d test studies (%d patients), %d skipped; %d channel volumes "
                 "resampled; labels placed by %s", metrics["n_train"], metrics["n_val"], metrics["n_test"],
                 len(strata), len(skipped), builder.n_resampled, dict(builder.methods) or "-")
    return StageResult(outputs={"datalist": str(path)}, metrics=metrics, inputs=builder.inputs)


def _tag(patient: str, study: str) -> str:
    """``<patient>/<study hash>``: the sub-folder of a study's resampled channels and label map."""
    return f"{safe_name(patient)}/{hashlib.sha1(study.encode()).hexdigest()[:8]}"
