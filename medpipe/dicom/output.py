"""What every DICOM writer of medpipe shares: identity, equipment, algorithm, codes, sources, saving.

The writers (:mod:`~medpipe.dicom.seg`, :mod:`~medpipe.dicom.sr`, :mod:`~medpipe.dicom.pmap`,
:mod:`~medpipe.dicom.sc`) take

* the **source datasets** (pydicom headers; ``stop_before_pixels=True`` is enough except for the
  secondary capture, which draws the source pixels), checked and completed by :func:`prepare_sources`;
* an :class:`OutputIdentity`: the new object's Series / SOP Instance UIDs, series number and a
  creation time, all chosen by the caller (:meth:`OutputIdentity.derived` derives the UIDs from a
  key, so re-running a scoring job names its outputs the same);
* an :class:`AlgorithmSpec` (name, version, family) and optionally :class:`Equipment`.

Reproducibility: highdicom stamps the current time (instance creation, contribution, secondary
capture) and draws random UIDs (dimension organisation). :func:`make_reproducible` replaces all of
them with values derived from the identity, so the same inputs give byte-identical files.

Codes are given as pydicom :class:`~pydicom.sr.coding.Code` or as JSON-able dicts
``{"scheme": "SCT", "value": "10200004", "meaning": "Liver"}`` (:func:`as_code`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

import medpipe
from medpipe.dicom.frames import instance_uid
from medpipe.dicom.uids import derive_uid
from medpipe.errors import DicomError
from medpipe.io import atomic_path

if TYPE_CHECKING:
    import highdicom as hd

log = logging.getLogger(__name__)

#: a coded concept: a pydicom Code, or ``{"scheme", "value", "meaning"[, "scheme_version"]}``
CodeLike = Code | Mapping[str, str]

#: DCM 123110 "Artificial Intelligence" (CID 7162 Segmentation Algorithm Family)
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

#: namespace of substitute UIDs for sources whose Study / Series Instance UID is blank
_SUBSTITUTE = "medpipe.substitute-uid"


def as_code(value: CodeLike | Any, what: str = "code") -> Code:
    """A pydicom ``Code`` from a Code, a highdicom ``CodedConcept`` or a ``{scheme, value, meaning}`` dict.

    Raises:
        DicomError: anything else, or a dict without a non-empty scheme, value and meaning.
    """
    if isinstance(value, Code):
        return value
    if all(hasattr(value, a) for a in ("value", "scheme_designator", "meaning")):  # highdicom CodedConcept
        return Code(str(value.value), str(value.scheme_designator), str(value.meaning),
                    getattr(value, "scheme_version", None) or None)
    if isinstance(value, Mapping):
        unknown = set(value) - {"scheme", "value", "meaning", "scheme_version"}
        missing = [k for k in ("scheme", "value", "meaning") if not str(value.get(k) or "").strip()]
        if unknown or missing:
            problem = f"unknown keys {sorted(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise DicomError(f"{what}: expected {{scheme, value, meaning}}, {problem}")
        version = value.get("scheme_version")
        return Code(str(value["value"]), str(value["scheme"]), str(value["meaning"]),
                    str(version) if version else None)
    raise DicomError(f"{what}: expected a pydicom Code or a {{scheme, value, meaning}} dict, got {type(value).__name__}")


def code_dict(code: Code) -> dict[str, str]:
    """The JSON-able form of ``code`` that :func:`as_code` reads back."""
    out = {"scheme": code.scheme_designator, "value": code.value, "meaning": code.meaning}
    if code.scheme_version:
        out["scheme_version"] = code.scheme_version
    return out


@dataclass(frozen=True)
class Equipment:
    """The software that writes the object (General Equipment / Enhanced General Equipment)."""

    manufacturer: str = "medpipe"
    model_name: str = "medpipe"
    software_versions: str = medpipe.__version__
    device_serial_number: str = "0"
    institution_name: str | None = None


#: the default writer identity: medpipe, its version
DEFAULT_EQUIPMENT = Equipment()


@dataclass(frozen=True)
class AlgorithmSpec:
    """The algorithm (model) that produced the content.

    ``family`` is a CID 7162 code (default DCM "Artificial Intelligence"); ``parameters`` are
    recorded as ``key=value`` text (e.g. the checkpoint hash, the decision threshold).
    """

    name: str
    version: str
    family: CodeLike = ARTIFICIAL_INTELLIGENCE
    source: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.name).strip() or not str(self.version).strip():
            raise DicomError("algorithm: name and version must not be empty")
        as_code(self.family, "algorithm family")

    def for_seg(self) -> hd.AlgorithmIdentificationSequence:
        """Segmentation Algorithm Identification (SEG segments, parametric map frames)."""
        import highdicom as hd

        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=as_code(self.family, "algorithm family"), version=self.version,
            source=self.source, parameters={str(k): str(v) for k, v in self.parameters.items()} or None,
        )

    def for_sr(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification (SR measurement groups)."""
        import highdicom as hd

        return hd.sr.AlgorithmIdentification(
            name=self.name, version=self.version,
            parameters=[f"{k}={v}" for k, v in self.parameters.items()] or None,
            family=as_code(self.family, "algorithm family"), manufacturer=self.source,
        )


@dataclass(frozen=True)
class OutputIdentity:
    """Who the new object is: its UIDs, series number and the time it counts as created.

    ``created`` becomes Content / Series / Instance Creation date and time (and the contribution and
    secondary-capture times): give a fixed value (e.g. the scoring run's start, recorded in its
    provenance) and the output is reproducible.
    """

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    created: dt.datetime
    instance_number: int = 1
    series_description: str | None = None

    def __post_init__(self) -> None:
        for name in ("series_instance_uid", "sop_instance_uid"):
            uid = str(getattr(self, name))
            if not uid or len(uid) > 64 or not all(p.isdigit() and (p == "0" or p[0] != "0") for p in uid.split(".")):
                raise DicomError(f"output {name} {uid!r} is not a valid UID")
        if not 0 < int(self.series_number) < 2**31 or not 0 < int(self.instance_number) < 2**31:
            raise DicomError("output series_number and instance_number must be positive integers")
        if self.series_description is not None and len(self.series_description) > 64:
            raise DicomError("output series_description is longer than 64 characters")

    @classmethod
    def derived(cls, *key: object, series_number: int, created: dt.datetime, instance_number: int = 1,
                series_description: str | None = None) -> OutputIdentity:
        """UIDs from ``key``: Series ``derive_uid(*key, "series")``, SOP Instance ``derive_uid(*key, "instance", n)``.

        Put in ``key`` what makes the object unique and stable, e.g.
        ``("medpipe.score", model_sha256, source_series_uid, "SEG")``.
        """
        return cls(
            derive_uid(*key, "series"), derive_uid(*key, "instance", instance_number), series_number, created,
            instance_number, series_description,
        )

    @property
    def date(self) -> DA:
        return DA(self.created.date())

    @property
    def time(self) -> TM:
        return TM(self.created.time().replace(microsecond=0))

    def sop_kwargs(self) -> dict[str, Any]:
        """The identity arguments of highdicom's SOP class constructors."""
        out: dict[str, Any] = {
            "series_instance_uid": self.series_instance_uid, "series_number": int(self.series_number),
            "sop_instance_uid": self.sop_instance_uid, "instance_number": int(self.instance_number),
            "content_date": self.date, "content_time": self.time,
            "series_date": self.date, "series_time": self.time,
        }
        if self.series_description is not None:
            out["series_description"] = self.series_description
        return out


# -- sources ------------------------------------------------------------------------------------------


def _replaced(ds: Dataset, values: Mapping[str, Any]) -> Dataset:
    """A new dataset sharing ``ds``'s elements, with ``values`` (keyword -> value) set; ``ds`` is untouched.

    (Setting an attribute that exists changes the element in place, which the two datasets share:
    the old element is removed first, so the new value goes into a new element.)
    """
    out = Dataset()
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset yields elements, decoding raw ones)
        out[tag] = ds.get_item(tag)
    for keyword, value in values.items():
        if keyword in out:
            del out[keyword]  # a new element below: the shared one keeps its value
        setattr(out, keyword, value)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


#: functional groups highdicom (0.28) reads from the shared groups of a multi-frame source only
_HOISTED = ("PlaneOrientationSequence", "PixelMeasuresSequence")


def _shared_geometry(ds: Dataset) -> Dataset:
    """``ds`` with per-frame Plane Orientation / Pixel Measures that are the same in every frame moved
    into the shared functional groups (an equivalent encoding, which highdicom needs).

    Raises:
        DicomError: frames of different orientations or pixel spacings (no single derived object
            of highdicom can follow them).
    """
    import copy

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    per_frame = ds.PerFrameFunctionalGroupsSequence
    todo = [name for name in _HOISTED if name not in shared and all(name in fg for fg in per_frame)]
    if not todo:
        return ds
    for name in todo:
        first = per_frame[0][name]
        if any(fg[name] != first for fg in per_frame):
            raise DicomError(f"source {instance_uid(ds)}: frames differ in {name}; "
                             "derived objects need one orientation and pixel spacing")
    new_shared = copy.deepcopy(shared)
    new_per_frame = copy.deepcopy(per_frame)
    for name in todo:
        new_shared[name] = copy.deepcopy(per_frame[0][name])
        for fg in new_per_frame:
            del fg[name]
    return _replaced(ds, {"SharedFunctionalGroupsSequence": [new_shared],
                          "PerFrameFunctionalGroupsSequence": new_per_frame})


#: Type 2 attributes of the Patient and General Study modules (present in every object, empty when unknown)
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def prepare_sources(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Check the source datasets of one output object and fill in blank identifying UIDs.

    All must belong to one study, one series and one frame of reference. De-identified exports
    sometimes blank the SOP Class / Instance UIDs (the file meta keeps them: used here, as ingest
    does) or the Study / Series Instance UIDs (a *substitute* UID is derived from the attributes
    that identify the study / series, the same for every output written for that series, and a
    warning is logged: such outputs cannot be matched to the series on a PACS). Type 2 Patient and
    General Study attributes an export left out are added empty (:data:`TYPE2_PATIENT_STUDY`). An enhanced
    multi-frame source whose per-frame Plane Orientation and Pixel Measures are the same in every
    frame gets them as shared functional groups instead (equivalent; highdicom reads them only
    there). The given datasets are never modified; changed ones are returned as new datasets
    sharing their unchanged elements.

    Raises:
        DicomError: no datasets, no SOP Instance / Class UID even in the file meta, or datasets of
            different studies, series or frames of reference.
    """
    if not datasets:
        raise DicomError("no source datasets")
    from medpipe.dicom.header import MISSING_UID_SERIES_KEYS

    out = []
    warned = set()
    for ds in datasets:
        fix: dict[str, str] = {}
        uid = instance_uid(ds)
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or "")
        if not uid or not sop_class:
            raise DicomError(f"source {uid or '(no UID)'}: no SOP Instance UID or SOP Class UID")
        if not str(ds.get("SOPInstanceUID") or ""):
            fix["SOPInstanceUID"] = uid
        if not str(ds.get("SOPClassUID") or ""):
            fix["SOPClassUID"] = sop_class
        if not str(ds.get("StudyInstanceUID") or ""):
            ident = [str(ds.get(k) or "") for k in ("PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                                                    "StudyID", "FrameOfReferenceUID")]
            fix["StudyInstanceUID"] = derive_uid(_SUBSTITUTE, "study", *ident)
        if not str(ds.get("SeriesInstanceUID") or ""):
            ident = [str(ds.get(k) or "") for k in MISSING_UID_SERIES_KEYS]
            fix["SeriesInstanceUID"] = derive_uid(_SUBSTITUTE, "series", *ident)
        # Type 2 Patient / General Study attributes an export left out: present and empty, as the standard
        # wants them in every object (highdicom copies them from the sources and stopped at the absent one)
        fix.update({k: "" for k in TYPE2_PATIENT_STUDY if k not in ds})
        for k in ("StudyInstanceUID", "SeriesInstanceUID"):
            if k in fix and k not in warned:
                warned.add(k)
                log.warning("source series has no %s: outputs reference the substitute %s", k, fix[k])
        fixed = _replaced(ds, fix) if fix else ds
        out.append(_shared_geometry(fixed) if "PerFrameFunctionalGroupsSequence" in fixed else fixed)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(d.get(keyword) or "") for d in out}
        if len(values) > 1:
            raise DicomError(f"source datasets differ in {keyword} ({len(values)} values): "
                             "write one object per series")
    return out


#: General Series attributes that describe the anatomy of the source series and stay true of outputs
SERIES_ANATOMY = ("BodyPartExamined", "Laterality")


def copy_series_anatomy(source: Dataset, target: Dataset, *, unknown_laterality: bool = False) -> None:
    """Copy Body Part Examined and Laterality of the source series into a new image series.

    Laterality (General Series, Type 2C) is required for paired body parts; when the source names
    neither the body part nor the laterality, nobody can tell. ``unknown_laterality`` then writes
    Laterality empty, which the standard reserves for "actually unknown" (dciodvfy requires it for
    Parametric Maps and Secondary Captures of such sources and warns that it is empty).
    """
    for keyword in SERIES_ANATOMY:
        value = source.get(keyword)
        if value:
            setattr(target, keyword, value)
    if unknown_laterality and not source.get("BodyPartExamined") and not source.get("Laterality"):
        target.Laterality = ""


def check_one_frame_per_position(sources: Sequence[Dataset]) -> None:
    """Multi-frame derived objects (SEG, Parametric Map) need one source frame per plane position.

    highdicom orders their frames by the distance along the slice normal and refuses duplicates;
    this says which frames collide first.

    Raises:
        DicomError: two source frames at the same distance along the normal (e.g. the echoes or
            image types of a multi-frame MR, or time points): write one object per stack.
    """
    from medpipe.dicom.frames import frame_geometries
    from medpipe.dicom.geometry import slice_normal

    frames = frame_geometries(sources)
    normal = slice_normal(frames[0].orientation)
    distance = np.round([float(np.dot(f.position, normal)) for f in frames], 3)
    seen: dict[float, int] = {}
    for i, d in enumerate(distance):
        if d in seen:
            a, b = frames[seen[d]], frames[i]
            raise DicomError(
                f"source frames {a.sop_instance_uid}#{a.frame_number or 1} and {b.sop_instance_uid}#{b.frame_number or 1} "
                "lie at the same position: write one object per stack (one frame per position)")
        seen[d] = i


# -- reproducible output ------------------------------------------------------------------------------


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def make_reproducible(ds: Dataset, identity: OutputIdentity) -> None:
    """Replace the times and random UIDs highdicom put into ``ds`` by values derived from ``identity``.

    Instance creation, contribution, secondary capture and verification times become
    ``identity.created``; every Dimension Organization UID becomes
    ``derive_uid(sop_instance_uid, "dimension-organization")``.
    """
    date, time = identity.date, identity.time
    stamp = DT(dt.datetime.combine(identity.created.date(), identity.created.time().replace(microsecond=0)))
    dim_uid = derive_uid(identity.sop_instance_uid, "dimension-organization")
    for item in _walk(ds):
        if "InstanceCreationDate" in item:
            item.InstanceCreationDate = date
        if "InstanceCreationTime" in item:
            item.InstanceCreationTime = time
        if "ContributionDateTime" in item:
            item.ContributionDateTime = stamp
        if "DateOfSecondaryCapture" in item:
            item.DateOfSecondaryCapture = date
        if "TimeOfSecondaryCapture" in item:
            item.TimeOfSecondaryCapture = time
        if "VerificationDateTime" in item:
            item.VerificationDateTime = stamp
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid


def save_dataset(ds: Dataset, target: Path | str) -> Path:
    """Write ``ds`` as a DICOM file (with file meta) to ``target`` atomically; return ``target``."""
    target = Path(target)
    with atomic_path(target) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return target
