"""DICOM SR measurement reports (TID 1500, Comprehensive 3D SR) for segmentations and classifiers.

* :func:`write_seg_sr`: one Volumetric ROI measurement group (TID 1411) per segment of a SEG written
  by :func:`medpipe.dicom.seg.write_seg`: the segment's volume in mL (SCT 118565006 "Volume", UCUM
  ``ml``) plus optional further numeric measurements, referencing the segment (Referenced Segment:
  the SEG's SOP Instance UID and segment number) and the source series (Source Series For
  Segmentation), with the segment's tracking identifier, finding type / category / site from its
  segment description, and the algorithm identification (TID 4019).
* :func:`write_classification_sr`: one Measurement and Qualitative Evaluation group (TID 1501) per
  class: its probability (DCM 122157 "Probability", UCUM ``1``) and the decision at the model's
  threshold as a coded finding (the class's finding code = SCT "Present" / "Absent"), with the
  threshold recorded as an algorithm parameter; the source images are listed in the report's image
  library (TID 1600).

Both documents record every referenced instance as evidence (Current Requested Procedure Evidence
Sequence), name the algorithm as the observing device, are marked COMPLETE / UNVERIFIED /
PRELIMINARY (machine output nobody has signed), and are reproducible.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from medpipe.dicom.frames import FrameGeometry, frame_geometries
from medpipe.dicom.geometry import slice_normal
from medpipe.dicom.output import (
    DEFAULT_EQUIPMENT,
    AlgorithmSpec,
    CodeLike,
    Equipment,
    OutputIdentity,
    as_code,
    make_reproducible,
    prepare_sources,
    save_dataset,
)
from medpipe.dicom.uids import derive_uid
from medpipe.errors import DicomError

if TYPE_CHECKING:
    import highdicom as hd

#: SCT 118565006 "Volume" and UCUM "ml" (milliliter)
VOLUME = Code("118565006", "SCT", "Volume")
MILLILITER = Code("ml", "UCUM", "milliliter")
#: DCM 122157 "Probability", unit UCUM "1" (no units)
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
#: SCT 363679005 "Imaging procedure" (CID 100), the default Procedure Reported
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class NumericMeasurement:
    """A further numeric measurement of a segment, e.g. mean HU (``name``, ``unit``: codes)."""

    name: CodeLike
    value: float
    unit: CodeLike


@dataclass(frozen=True)
class ClassResult:
    """One class of a classifier's output for the source images.

    ``finding`` codes what the class means (e.g. SCT 254837009 "Malignant neoplasm of breast");
    the decision is ``probability >= threshold``. ``label`` (default: the finding's meaning) is the
    group's human-readable tracking identifier.
    """

    finding: CodeLike
    probability: float
    threshold: float
    label: str | None = None
    finding_site: CodeLike | None = None

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class _Report:
    """What both SR writers share."""

    algorithm: AlgorithmSpec
    identity: OutputIdentity
    equipment: Equipment = DEFAULT_EQUIPMENT
    procedure: CodeLike = IMAGING_PROCEDURE

    def observation_context(self) -> hd.sr.ObservationContext:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        a, e = self.algorithm, self.equipment
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("medpipe.device", e.manufacturer, e.model_name, a.name, a.version),
            name=a.name[:64], manufacturer_name=e.manufacturer, model_name=e.model_name,
        )
        return hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device,
            ),
        )

    def document(self, evidence: Sequence[Dataset], report: hd.sr.MeasurementReport) -> hd.sr.Comprehensive3DSR:
        import highdicom as hd

        kwargs = self.identity.sop_kwargs()
        if self.identity.series_description is None:
            kwargs["series_description"] = f"SR {self.algorithm.name}"[:64]
        e = self.equipment
        try:
            sr = hd.sr.Comprehensive3DSR(
                evidence=list(evidence), content=report[0], manufacturer=e.manufacturer,
                manufacturer_model_name=e.model_name, software_versions=e.software_versions,
                device_serial_number=e.device_serial_number, institution_name=e.institution_name,
                is_complete=True, is_final=False, is_verified=False, **kwargs,
            )
        except ValueError as exc:
            raise DicomError(f"cannot build the SR: {exc}") from exc
        make_reproducible(sr, self.identity)
        return sr


# -- segmentation report ------------------------------------------------------------------------------


def slab_thicknesses(frames: Sequence[FrameGeometry]) -> np.ndarray:
    """The thickness (mm) each frame stands for: half the distance to each neighbour along the normal.

    Exact for evenly spaced stacks (the spacing), and the natural weight of each frame for uneven
    ones (a missing slice's gap is shared by its neighbours). Works for tilted stacks (distances are
    taken along the slice normal).

    Raises:
        DicomError: frames of different orientations, several frames at one position (echoes /
            time points: pass the volumes yourself), or a single frame (no spacing to use).
    """
    iops = np.array([f.orientation for f in frames], dtype=float)
    if np.abs(iops - iops[0]).max() > 1e-4:
        raise DicomError("source frames have different orientations: cannot measure volumes from them")
    if len(frames) < 2:
        raise DicomError("a single source frame has no slice spacing: pass volumes_ml")
    d = np.array([f.position for f in frames], dtype=float) @ slice_normal(iops[0])
    order = np.argsort(d)
    gaps = np.diff(d[order])
    if np.any(gaps < 1e-3):
        raise DicomError("several source frames lie at one position (echoes or time points?): pass volumes_ml")
    widths = np.empty(len(d))
    widths[order] = (np.concatenate([[gaps[0]], gaps]) + np.concatenate([gaps, [gaps[-1]]])) / 2
    return widths


def segment_volumes_ml(masks: np.ndarray, frames: Sequence[FrameGeometry]) -> np.ndarray:
    """Volume (mL) of each segment of per-frame ``masks`` ``(frames, rows, columns, segments)``.

    Each pixel counts for its pixel area times its frame's :func:`slab_thicknesses`.
    """
    masks = np.asarray(masks)
    if masks.ndim != 4 or masks.shape[0] != len(frames):
        raise DicomError(f"expected masks (frames, rows, columns, segments) for {len(frames)} frames, got {masks.shape}")
    area = np.array([f.pixel_spacing[0] * f.pixel_spacing[1] for f in frames])
    weight = area * slab_thicknesses(frames) / 1000.0  # mm^3 -> mL
    counts = (masks > 0).sum(axis=(1, 2), dtype=np.int64)  # (frames, segments)
    return (weight[:, None] * counts).sum(axis=0)


def build_seg_sr(
    seg: Dataset,
    sources: Sequence[Dataset],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    *,
    volumes_ml: Mapping[int, float] | None = None,
    measurements: Mapping[int, Sequence[NumericMeasurement]] | None = None,
    equipment: Equipment = DEFAULT_EQUIPMENT,
    procedure: CodeLike = IMAGING_PROCEDURE,
) -> hd.sr.Comprehensive3DSR:
    """The SEG's measurement report (not written): see :func:`write_seg_sr`."""
    import highdicom as hd

    from medpipe.dicom.seg import LABELMAP_SEG_STORAGE, SEG_STORAGE, seg_to_source_frames

    if str(seg.get("SOPClassUID")) not in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
        raise DicomError(f"not a DICOM SEG (SOP Class {seg.get('SOPClassUID')})")
    sources = prepare_sources(sources)
    series_uid = str(sources[0].SeriesInstanceUID)
    referenced = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
    if series_uid not in referenced:
        raise DicomError(f"the SEG does not reference the source series {series_uid}")
    descriptions = {int(d.SegmentNumber): d for d in seg.SegmentSequence if int(d.SegmentNumber) > 0}
    numbers = sorted(descriptions)
    if volumes_ml is None:
        frames = frame_geometries(sources)
        volumes = segment_volumes_ml(seg_to_source_frames(seg, frames, numbers), frames)
        volumes_ml = dict(zip(numbers, (float(v) for v in volumes)))
    unknown = sorted(set(volumes_ml) - set(numbers)) + sorted(set(measurements or {}) - set(numbers))
    if unknown:
        raise DicomError(f"the SEG has no segment(s) {unknown} (it has {numbers})")
    report = _Report(algorithm, identity, equipment, procedure)
    groups = []
    for n in numbers:
        desc = descriptions[n]
        label = str(desc.SegmentLabel)
        values = []
        if n in volumes_ml:
            values.append(hd.sr.Measurement(name=VOLUME, value=float(volumes_ml[n]), unit=MILLILITER))
        for m in (measurements or {}).get(n, ()):
            values.append(hd.sr.Measurement(
                name=as_code(m.name, f"segment {n} measurement name"), value=float(m.value),
                unit=as_code(m.unit, f"segment {n} measurement unit"),
            ))
        sites = [hd.sr.FindingSite(anatomic_location=hd.sr.CodedConcept.from_dataset(r))
                 for r in desc.get("AnatomicRegionSequence", [])]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(desc.get("TrackingUID") or derive_uid(seg.SOPInstanceUID, "segment", n)),
                identifier=str(desc.get("TrackingID") or label),
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=n,
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
            ),
            finding_type=hd.sr.CodedConcept.from_dataset(desc.SegmentedPropertyTypeCodeSequence[0]),
            finding_category=hd.sr.CodedConcept.from_dataset(desc.SegmentedPropertyCategoryCodeSequence[0]),
            finding_sites=sites or None,
            algorithm_id=algorithm.for_sr(),
            measurements=values or None,
        ))
    return report.document([seg, *sources], _measurement_report(report, groups))


def _measurement_report(report: _Report, groups: list[Any], images: Sequence[Dataset] = ()) -> Any:
    """TID 1500 of ``groups`` (built and checked here) and an image library of the ``images`` highdicom can describe
    (:func:`_describable`)."""
    import highdicom as hd

    return hd.sr.MeasurementReport(
        observation_context=report.observation_context(),
        procedure_reported=as_code(report.procedure, "procedure reported"),
        imaging_measurements=groups,
        referenced_images=_describable(images) or None,
    )


def write_seg_sr(
    target: Path | str,
    seg: Dataset,
    sources: Sequence[Dataset],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    **options: Any,
) -> hd.sr.Comprehensive3DSR:
    """Write a TID 1500 report of the volume of every segment of ``seg``; return it.

    Args:
        target: output file (written atomically).
        seg: the SEG (as returned by :func:`~medpipe.dicom.seg.write_seg`, or read from its file).
        sources: the source series' datasets the SEG was written on (headers suffice).
        algorithm: the model (usually the SEG's).
        identity: UIDs, series number and creation time of the SR.
        **options: ``volumes_ml`` ({segment number: mL}; default: measured from the SEG's frames with
            :func:`segment_volumes_ml`), ``measurements`` ({segment number: [NumericMeasurement]}),
            ``equipment``, ``procedure`` (Procedure Reported code, default SCT "Imaging procedure").

    Raises:
        DicomError: a SEG that does not reference the source series, unknown segment numbers,
            or sources whose spacing cannot give a volume (then pass ``volumes_ml``).
    """
    sr = build_seg_sr(seg, sources, algorithm, identity, **options)
    save_dataset(sr, target)
    return sr


# -- classifier report --------------------------------------------------------------------------------


def build_classification_sr(
    sources: Sequence[Dataset],
    results: Sequence[ClassResult],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    *,
    equipment: Equipment = DEFAULT_EQUIPMENT,
    procedure: CodeLike = IMAGING_PROCEDURE,
    probability_concept: CodeLike = PROBABILITY,
) -> hd.sr.Comprehensive3DSR:
    """The classifier's report (not written): see :func:`write_classification_sr`."""
    import highdicom as hd

    if not results:
        raise DicomError("at least one class result is needed")
    sources = prepare_sources(sources)
    report = _Report(algorithm, identity, equipment, procedure)
    name = as_code(probability_concept, "probability concept")
    groups = []
    for i, r in enumerate(results):
        finding = as_code(r.finding, f"class {i} finding")
        what = r.label or finding.meaning
        if not (0.0 <= float(r.probability) <= 1.0) or not (0.0 <= float(r.threshold) <= 1.0):
            raise DicomError(f"class {what!r}: probability and threshold must lie in [0, 1]")
        parameters = {**algorithm.parameters, "threshold": f"{float(r.threshold):g}"}
        class_algorithm = AlgorithmSpec(algorithm.name, algorithm.version, algorithm.family, algorithm.source,
                                        parameters)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(identity.sop_instance_uid, "class", i, finding.scheme_designator, finding.value),
                identifier=what[:64],
            ),
            finding_type=finding,
            finding_sites=[hd.sr.FindingSite(as_code(r.finding_site, f"class {what!r} finding site"))]
            if r.finding_site else None,
            algorithm_id=class_algorithm.for_sr(),
            measurements=[hd.sr.Measurement(name=name, value=float(r.probability), unit=NO_UNITS)],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=finding, value=PRESENT if r.positive else ABSENT),
            ],
        ))
    return report.document(sources, _measurement_report(report, groups, sources))


def _describable(images: Sequence[Dataset]) -> list[Dataset]:
    """The images highdicom can describe in an image library (TID 1600): it reads classic images' top-level
    attributes (Pixel Spacing, Imager Pixel Spacing, position...), so an enhanced multi-frame image or a radiograph
    without Imager Pixel Spacing is cited as evidence only (each raised AttributeError before)."""
    import highdicom as hd

    out = []
    for ds in images:
        try:
            hd.sr.ImageLibraryEntryDescriptors(ds)
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        out.append(ds)
    return out


def write_classification_sr(
    target: Path | str,
    sources: Sequence[Dataset],
    results: Sequence[ClassResult],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    **options: Any,
) -> hd.sr.Comprehensive3DSR:
    """Write a TID 1500 report of a classifier's per-class probabilities and decisions; return it.

    Args:
        target: output file (written atomically).
        sources: the images that were classified (one series; headers suffice).
        results: one :class:`ClassResult` per class reported.
        algorithm: the model.
        identity: UIDs, series number and creation time of the SR.
        **options: ``equipment``, ``procedure``, ``probability_concept`` (default DCM "Probability").

    Raises:
        DicomError: no results, probabilities or thresholds outside [0, 1], sources of several series.
    """
    sr = build_classification_sr(sources, results, algorithm, identity, **options)
    save_dataset(sr, target)
    return sr


# -- findings at points (detections) -----------------------------------------------------------------

#: SCT 27925004 "Nodule", the default finding type of a point finding
NODULE = Code("27925004", "SCT", "Nodule")
#: SCT 39607008 "Lung", the default finding site
LUNG = Code("39607008", "SCT", "Lung")
#: SCT 81827009 "Diameter" and UCUM "mm"
DIAMETER = Code("81827009", "SCT", "Diameter")
MILLIMETER = Code("mm", "UCUM", "millimeter")


@dataclass(frozen=True)
class PointFinding:
    """A finding at one point of the patient: a nodule's centre, its diameter and (for a detector) its score.

    ``center`` is in the patient coordinate system of DICOM (LPS, mm) of the sources' frame of
    reference: it becomes a SCOORD3D ``POINT``. ``diameter_mm`` becomes a Diameter measurement (SCT
    81827009, UCUM ``mm``), ``score`` a Probability measurement (DCM 122157, UCUM ``1``, in [0, 1]).
    ``label`` is the human-readable tracking identifier (default ``Finding <n>``), ``tracking_uid``
    its UID (default: derived from the SR's SOP Instance UID and the finding's index).
    """

    center: tuple[float, float, float]
    diameter_mm: float | None = None
    score: float | None = None
    label: str | None = None
    finding: CodeLike = NODULE
    finding_site: CodeLike | None = LUNG
    tracking_uid: str | None = None


def build_findings_sr(
    sources: Sequence[Dataset],
    findings: Sequence[PointFinding],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    *,
    equipment: Equipment = DEFAULT_EQUIPMENT,
    procedure: CodeLike = IMAGING_PROCEDURE,
    absent: CodeLike = NODULE,
) -> hd.sr.Comprehensive3DSR:
    """The findings report (not written): see :func:`write_findings_sr`."""
    import highdicom as hd

    sources = prepare_sources(sources)
    frame_of_reference = str(sources[0].get("FrameOfReferenceUID") or "")
    if not frame_of_reference:
        raise DicomError("the source series has no Frame Of Reference UID: points cannot be given in its space")
    report = _Report(algorithm, identity, equipment, procedure)
    groups = []
    for i, f in enumerate(findings, start=1):
        what = f.label or f"Finding {i}"
        point = np.asarray(f.center, dtype=np.float64)
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise DicomError(f"finding {what!r}: the centre must be three finite numbers, got {f.center!r}")
        values = []
        if f.diameter_mm is not None:
            if not (np.isfinite(f.diameter_mm) and f.diameter_mm > 0):
                raise DicomError(f"finding {what!r}: the diameter must be a positive number, got {f.diameter_mm!r}")
            values.append(hd.sr.Measurement(name=DIAMETER, value=float(f.diameter_mm), unit=MILLIMETER))
        if f.score is not None:
            if not 0.0 <= float(f.score) <= 1.0:
                raise DicomError(f"finding {what!r}: the score must lie in [0, 1], got {f.score!r}")
            values.append(hd.sr.Measurement(name=PROBABILITY, value=float(f.score), unit=NO_UNITS))
        try:
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                         graphic_data=point.reshape(1, 3),
                                         frame_of_reference_uid=frame_of_reference)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=f.tracking_uid or derive_uid(identity.sop_instance_uid, "finding", i), identifier=what[:64]),
                referenced_region=region,
                finding_type=as_code(f.finding, f"finding {what!r} type"),
                finding_sites=[hd.sr.FindingSite(as_code(f.finding_site, f"finding {what!r} site"))]
                if f.finding_site else None,
                algorithm_id=algorithm.for_sr(),
                measurements=values or None,
            ))
        except (ValueError, TypeError) as exc:
            raise DicomError(f"finding {what!r}: {exc}") from exc
    if not groups:  # TID 1500 needs a group: say "absent" (SCT 272519000) of the kind of finding reported
        finding = as_code(absent, "absent finding")
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derive_uid(identity.sop_instance_uid, "no finding"),
                                                         identifier=f"No {finding.meaning.lower()}"[:64]),
            finding_type=finding, algorithm_id=algorithm.for_sr(),
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=ABSENT)],
        ))
    # no image library (TID 1600): the points are in the frame of reference, and the evidence lists the series
    return report.document(sources, _measurement_report(report, groups))


def write_findings_sr(
    target: Path | str,
    sources: Sequence[Dataset],
    findings: Sequence[PointFinding],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    **options: Any,
) -> hd.sr.Comprehensive3DSR:
    """Write a TID 1500 report of point findings (e.g. detected nodules); return it.

    One Planar ROI group (TID 1410) per finding: its centre as a SCOORD3D ``POINT`` in the sources'
    frame of reference, its diameter (mm) and score as measurements, finding type and site, tracking
    identifier and UID, and the algorithm. The source series is listed as evidence. Without findings
    the report holds one Measurement and Qualitative Evaluation group (TID 1501) saying the finding
    ``absent`` (default SCT "Nodule") is Absent (SCT 272519000).

    Args:
        target: output file (written atomically).
        sources: the series the findings were made on (headers suffice).
        findings: one :class:`PointFinding` each.
        algorithm: the model (or the generator of ground truth).
        identity: UIDs, series number and creation time of the SR.
        **options: ``equipment``, ``procedure``, ``absent`` (the finding reported absent when there is none).

    Raises:
        DicomError: non-finite centres, non-positive diameters, scores outside [0, 1], sources of
            several series or without a frame of reference.
    """
    sr = build_findings_sr(sources, findings, algorithm, identity, **options)
    save_dataset(sr, target)
    return sr


@dataclass(frozen=True)
class FindingsReport:
    """What :func:`read_findings_sr` finds in a TID 1500 document."""

    findings: list[PointFinding]
    frame_of_reference_uid: str | None
    referenced_series: list[str]


def read_findings_sr(sr: Dataset | Path | str) -> FindingsReport:
    """The point findings of a TID 1500 report (as :func:`write_findings_sr` writes them, or any report whose
    Planar or Volumetric ROI groups have a SCOORD3D ``POINT``): centre, diameter, score, type, site, tracking.

    Groups without a 3D point (2D regions, segment references) are skipped.

    Raises:
        DicomError: not an SR document, or not a TID 1500 measurement report.
    """
    import highdicom as hd
    import pydicom

    given = isinstance(sr, Dataset)
    ds = sr if given else pydicom.dcmread(str(sr))
    if str(ds.get("Modality")) != "SR":
        raise DicomError(f"not a DICOM SR (Modality {ds.get('Modality')!r})")
    try:
        # highdicom converts the content items of the dataset it is given in place, even with copy=True
        # (1500 documents: it parses dataset.ContentSequence, not its copy's): a caller's dataset is copied first
        doc = ds if isinstance(ds, hd.sr.Comprehensive3DSR) else hd.sr.Comprehensive3DSR.from_dataset(
            copy.deepcopy(ds) if given else ds, copy=False)
        groups = doc.content.get_planar_roi_measurement_groups() + doc.content.get_volumetric_roi_measurement_groups()
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise DicomError(f"not a TID 1500 measurement report: {exc}") from exc
    findings: list[PointFinding] = []
    frames: set[str] = set()
    for g in groups:
        region = getattr(g, "roi", None)
        if region is None or getattr(region, "graphic_type", None) != hd.sr.GraphicTypeValues3D.POINT:
            continue
        # a planar group's point is one SCOORD3D item; a volumetric group's is a volume surface around it
        data = region.graphic_data if isinstance(region, hd.sr.VolumeSurface) else region.value
        point = np.asarray(data, dtype=np.float64).reshape(-1)[:3]
        frames.add(str(region.frame_of_reference_uid))
        diameter = score = None
        for m in g.get_measurements():
            if _same_code(m.name, DIAMETER):
                diameter = float(m.value) * (10.0 if str(m.unit.value) == "cm" else 1.0)
            elif _same_code(m.name, PROBABILITY):
                score = float(m.value)
        sites = g.finding_sites
        tracking_uid = g.tracking_uid
        findings.append(PointFinding(
            center=(float(point[0]), float(point[1]), float(point[2])), diameter_mm=diameter, score=score,
            label=g.tracking_identifier, finding=_plain_code(g.finding_type) if g.finding_type else NODULE,
            finding_site=_plain_code(sites[0].value) if sites else None,
            tracking_uid=str(tracking_uid) if tracking_uid is not None else None))
    series = sorted({str(s.SeriesInstanceUID) for item in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                     for s in item.get("ReferencedSeriesSequence", [])})
    return FindingsReport(findings, frames.pop() if len(frames) == 1 else None, series)


def _same_code(a: Any, b: Code) -> bool:
    return str(a.value) == b.value and str(a.scheme_designator) == b.scheme_designator


def _plain_code(c: Any) -> Code:
    return Code(str(c.value), str(c.scheme_designator), str(c.meaning))
