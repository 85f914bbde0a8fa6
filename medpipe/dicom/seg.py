"""DICOM Segmentation (SEG) objects on the frames of a source series: write, and read back.

Writing::

    from medpipe.dicom.frames import frame_geometries, sample_frames
    from medpipe.dicom.seg import SegmentSpec, write_seg

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]   # any order
    masks = sample_frames(labels, affine, frame_geometries(sources))         # (frames, rows, cols)
    write_seg(out / "seg.dcm", sources, masks, [SegmentSpec("Liver", TISSUE, LIVER)], algorithm, identity)

``masks`` is given on the source frames: frame ``i`` lies on ``sources[i]`` (single-frame sources) or
on frame ``i + 1`` of the one multi-frame source. Use :func:`~medpipe.dicom.frames.sample_frames`
to get it from a volume on any grid. It is either a label map per frame ``(frames, rows, columns)``
whose value ``n`` means segment ``n`` (the ``n``-th spec, 1-based) or stacked binary masks
``(frames, rows, columns, segments)`` (segments may overlap in a BINARY SEG).

The SEG is BINARY by default (the Segmentation Storage SOP class every viewer reads) or LABELMAP
(Label Map Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.7, new in 2024: compact, one frame per
plane, no overlaps; dicom3tools' ``dciodvfy`` validates it, many viewers do not read it yet).
It shares the source's study, patient and frame of reference, references every source instance,
and is reproducible (see :mod:`medpipe.dicom.output`). highdicom reads only the source headers:
datasets read with ``stop_before_pixels=True`` are enough.

Reading back: :func:`read_seg_frames` gives every SEG frame with its own plane geometry (for
world-space checks); :func:`seg_to_source_frames` puts the segments back onto source frames (the
inverse of the writer). To put a SEG onto an ingested volume use
:func:`medpipe.data.volumes.seg_to_labelmap`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydicom.dataset import Dataset

from medpipe.dicom.frames import FrameGeometry, derived_frame_sources, frame_geometries, source_frame_index
from medpipe.dicom.output import (
    DEFAULT_EQUIPMENT,
    AlgorithmSpec,
    CodeLike,
    Equipment,
    OutputIdentity,
    as_code,
    check_one_frame_per_position,
    copy_series_anatomy,
    make_reproducible,
    prepare_sources,
    save_dataset,
)
from medpipe.dicom.uids import derive_uid
from medpipe.errors import DicomError

if TYPE_CHECKING:
    import highdicom as hd

SegmentationType = Literal["BINARY", "LABELMAP"]

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), used in turn for
#: segments without a colour of their own
SEGMENT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167),
)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: label, SNOMED CT category and type, optional anatomic region and display colour.

    Codes are pydicom ``Code`` objects or ``{"scheme", "value", "meaning"}`` dicts (so specs can live
    in JSON / YAML, see :meth:`from_dict`). ``color`` is RGB 0-255 (default: the Okabe-Ito palette in
    turn). ``tracking_id`` defaults to the label; ``tracking_uid`` to a UID derived from the SEG's SOP
    Instance UID and the segment number (the SR writer repeats it, tying measurements to segments).
    """

    label: str
    category: CodeLike
    type: CodeLike
    anatomic_region: CodeLike | None = None
    color: tuple[int, int, int] | None = None
    tracking_id: str | None = None
    tracking_uid: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentSpec:
        """From ``{"label", "category", "type"[, "anatomic_region", "color", "tracking_id", "tracking_uid"]}``."""
        known = {"label", "category", "type", "anatomic_region", "color", "tracking_id", "tracking_uid"}
        unknown = set(d) - known
        if unknown:
            raise DicomError(f"segment {d.get('label', '?')!r}: unknown keys {sorted(unknown)}")
        missing = [k for k in ("label", "category", "type") if k not in d]
        if missing:
            raise DicomError(f"segment {d.get('label', '?')!r}: missing {', '.join(missing)}")
        color = d.get("color")
        return cls(
            str(d["label"]), d["category"], d["type"], d.get("anatomic_region"),
            tuple(int(c) for c in color) if color is not None else None,  # type: ignore[arg-type]
            d.get("tracking_id"), d.get("tracking_uid"),
        )

    def description(self, number: int, algorithm: AlgorithmSpec, seg_uid: str) -> hd.seg.SegmentDescription:
        import highdicom as hd

        what = f"segment {number} ({self.label!r})"
        if not self.label.strip() or len(self.label) > 64:
            raise DicomError(f"{what}: the label must be 1-64 characters")
        rgb = self.color or SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]
        if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
            raise DicomError(f"{what}: color must be three integers 0-255, got {rgb!r}")
        try:
            return hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=self.label,
                segmented_property_category=as_code(self.category, f"{what} category"),
                segmented_property_type=as_code(self.type, f"{what} type"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm.for_seg(),
                tracking_uid=self.tracking_uid or derive_uid(seg_uid, "segment", number),
                tracking_id=self.tracking_id or self.label,
                anatomic_regions=(
                    [as_code(self.anatomic_region, f"{what} anatomic region")] if self.anatomic_region else None
                ),
                display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in rgb)),
            )
        except ValueError as exc:  # highdicom's checks on lengths and characters
            raise DicomError(f"{what}: {exc}") from exc


def _n_frames(sources: Sequence[Dataset]) -> int:
    if len(sources) == 1:
        return int(sources[0].get("NumberOfFrames") or 1)
    return len(sources)


def check_masks(masks: np.ndarray, sources: Sequence[Dataset], n_segments: int) -> np.ndarray:
    """Validate per-frame ``masks`` against the sources; return them as unsigned integers.

    Raises:
        DicomError: wrong shape, negative or non-integer values, or label values without a segment.
    """
    masks = np.asarray(masks)
    n = _n_frames(sources)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if masks.ndim not in (3, 4) or masks.shape[:3] != (n, rows, cols):
        raise DicomError(f"masks of shape {masks.shape} do not fit {n} source frames of {rows}x{cols} "
                         "(expected (frames, rows, columns) or (frames, rows, columns, segments))")
    if masks.dtype.kind == "f":
        if not np.all(np.isfinite(masks)) or np.any(masks != np.round(masks)):
            raise DicomError("masks must hold integers (label map) or 0/1 (stacked segments), not fractions")
    elif masks.dtype.kind not in "uib":
        raise DicomError(f"masks must be integer or boolean, not {masks.dtype}")
    if masks.size and masks.min() < 0:
        raise DicomError("masks must not be negative")
    top = int(masks.max()) if masks.size else 0
    if masks.ndim == 4:
        if masks.shape[3] != n_segments:
            raise DicomError(f"masks have {masks.shape[3]} segments but {n_segments} segment specs were given")
        if top > 1:
            raise DicomError("stacked segment masks must be binary (0/1)")
        return masks.astype(np.uint8, copy=False)
    if top > n_segments:
        raise DicomError(f"label map holds value {top} but only {n_segments} segment specs were given")
    return masks.astype(np.uint8 if n_segments < 256 else np.uint16, copy=False)


def build_seg(
    sources: Sequence[Dataset],
    masks: np.ndarray,
    segments: Sequence[SegmentSpec | Mapping[str, Any]],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    *,
    segmentation_type: SegmentationType = "BINARY",
    omit_empty_frames: bool = True,
    equipment: Equipment = DEFAULT_EQUIPMENT,
    content_label: str = "SEGMENTATION",
    content_description: str | None = None,
    content_qualification: Literal["RESEARCH", "PRODUCT", "SERVICE"] = "RESEARCH",
) -> hd.seg.Segmentation:
    """The SEG object (not written): see the module docstring and :func:`write_seg`."""
    import highdicom as hd

    if segmentation_type not in ("BINARY", "LABELMAP"):
        raise DicomError(f"segmentation_type must be BINARY or LABELMAP, not {segmentation_type!r}")
    specs = [s if isinstance(s, SegmentSpec) else SegmentSpec.from_dict(s) for s in segments]
    if not specs:
        raise DicomError("at least one segment spec is needed")
    sources = prepare_sources(sources)
    check_one_frame_per_position(sources)
    pixels = check_masks(masks, sources, len(specs))
    if segmentation_type == "LABELMAP" and pixels.ndim == 4:
        if np.any(pixels.sum(axis=3, dtype=np.int64) > 1):
            raise DicomError("a LABELMAP SEG cannot hold overlapping segments")
        labels = np.zeros(pixels.shape[:3], dtype=np.uint8 if len(specs) < 256 else np.uint16)
        for s in range(pixels.shape[3]):
            labels[pixels[..., s] > 0] = s + 1
        pixels = labels
    descriptions = [spec.description(n, algorithm, identity.sop_instance_uid) for n, spec in enumerate(specs, 1)]
    kwargs = identity.sop_kwargs()
    if identity.series_description is None:
        kwargs["series_description"] = f"SEG {algorithm.name}"[:64]
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            manufacturer=equipment.manufacturer,
            manufacturer_model_name=equipment.model_name,
            software_versions=equipment.software_versions,
            device_serial_number=equipment.device_serial_number,
            institution_name=equipment.institution_name,
            content_label=content_label,
            content_description=content_description,
            content_qualification=content_qualification,
            # highdicom keeps every frame of an all-empty mask (an empty SEG is still valid); say so
            omit_empty_frames=bool(omit_empty_frames and pixels.any()),
            **kwargs,
        )
    except ValueError as exc:  # highdicom validates eagerly; its messages name the attribute
        raise DicomError(f"cannot build the SEG: {exc}") from exc
    copy_series_anatomy(sources[0], seg)
    make_reproducible(seg, identity)
    return seg


def write_seg(
    target: Path | str,
    sources: Sequence[Dataset],
    masks: np.ndarray,
    segments: Sequence[SegmentSpec | Mapping[str, Any]],
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    **options: Any,
) -> hd.seg.Segmentation:
    """Write a SEG of per-frame ``masks`` on ``sources`` to ``target`` (atomically); return it.

    Args:
        target: output file.
        sources: the source series' datasets (headers suffice), in the order of ``masks``' frames.
        masks: ``(frames, rows, columns)`` label map (value ``n`` = ``segments[n - 1]``) or
            ``(frames, rows, columns, segments)`` binary masks.
        segments: one :class:`SegmentSpec` (or its dict) per segment, numbered from 1.
        algorithm: the model that made the masks.
        identity: UIDs, series number and creation time of the SEG.
        **options: ``segmentation_type`` ("BINARY" | "LABELMAP"), ``omit_empty_frames`` (True),
            ``equipment``, ``content_label``, ``content_description``, ``content_qualification``;
            see :func:`build_seg`.

    Raises:
        DicomError: masks that do not fit the sources, invalid specs, or sources of several series.
    """
    seg = build_seg(sources, masks, segments, algorithm, identity, **options)
    save_dataset(seg, target)
    return seg


# -- reading back -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegFrame:
    """One frame of a SEG with its own plane geometry.

    ``segment_number`` is the frame's segment (BINARY / FRACTIONAL), or 0 for a LABELMAP frame, whose
    pixel values are segment numbers. ``source_*`` name the source frame it was derived from (None if
    the SEG does not say).
    """

    geometry: FrameGeometry
    segment_number: int
    source_sop_instance_uid: str | None
    source_frame_number: int | None
    pixels: np.ndarray  # (rows, columns)


def _as_dataset(seg: Dataset | Path | str) -> Dataset:
    if isinstance(seg, Dataset):
        return seg
    import pydicom

    return pydicom.dcmread(str(seg))


def read_seg_frames(seg: Dataset | Path | str) -> list[SegFrame]:
    """Every frame of a SEG (dataset or file) with its plane geometry, segment and source frame."""
    ds = _as_dataset(seg)
    if str(ds.get("SOPClassUID")) not in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
        raise DicomError(f"not a DICOM SEG (SOP Class {ds.get('SOPClassUID')})")
    geometry = frame_geometries([ds])
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    labelmap = ds.get("SegmentationType") == "LABELMAP"
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    sources = derived_frame_sources(ds)
    out = []
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ident = fg.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        number = 0 if labelmap or not ident else int(ident[0].ReferencedSegmentNumber)
        out.append(SegFrame(geometry[i], number, sources[i][0], sources[i][1], pixels[i]))
    return out


def seg_to_source_frames(
    seg: Dataset | Path | str,
    frames: Sequence[FrameGeometry],
    segment_numbers: Sequence[int] | None = None,
) -> np.ndarray:
    """The SEG's segments on the given source ``frames``: ``(frames, rows, columns, segments)`` bool.

    The inverse of :func:`write_seg`: each SEG frame goes onto the source frame it was derived from
    (omitted empty frames stay empty). ``segment_numbers`` defaults to all segments in order.

    Raises:
        DicomError: a SEG frame that references none of ``frames``, or of another size.
    """
    ds = _as_dataset(seg)
    numbers = [int(s.SegmentNumber) for s in ds.SegmentSequence if int(s.SegmentNumber) > 0]
    wanted = list(numbers if segment_numbers is None else segment_numbers)
    column = {n: c for c, n in enumerate(wanted)}
    where = source_frame_index(frames)
    rows, cols = frames[0].rows, frames[0].columns
    out = np.zeros((len(frames), rows, cols, len(wanted)), dtype=bool)
    for f in read_seg_frames(ds):
        key = (f.source_sop_instance_uid, f.source_frame_number)
        if key not in where:
            raise DicomError(f"SEG frame on source {key[0]} frame {key[1]} is not among the given source frames")
        if f.pixels.shape != (rows, cols):
            raise DicomError(f"SEG frames are {f.pixels.shape[0]}x{f.pixels.shape[1]}, source frames {rows}x{cols}")
        i = where[key]
        if f.segment_number == 0:  # LABELMAP: pixel values are segment numbers
            for n, c in column.items():
                out[i, :, :, c] |= f.pixels == n
        elif f.segment_number in column:
            out[i, :, :, column[f.segment_number]] |= f.pixels > 0
    return out
