"""RGB Secondary Capture overlays: a source frame in grey with a map and / or an outline in colour.

For viewers that show no Parametric Maps or SEGs: one single-frame RGB Secondary Capture image per
source frame, in the source's study (same patient and study, its own series), referencing the source
frame (Source Image Sequence). The map is drawn with the cividis colour map (designed to read the
same with the common colour-vision deficiencies) blended over the grey image in proportion to the
map's value; the outline (the boundary pixels of a mask) in Okabe-Ito vermillion, which stands out
against every cividis colour. :func:`render_overlay` makes the RGB array alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from medpipe.dicom.frames import instance_uid
from medpipe.dicom.output import (
    DEFAULT_EQUIPMENT,
    Equipment,
    OutputIdentity,
    copy_series_anatomy,
    make_reproducible,
    prepare_sources,
    save_dataset,
)
from medpipe.errors import DicomError

if TYPE_CHECKING:
    import highdicom as hd

#: cividis at 0, 1/32, ..., 1 (matplotlib's table, 8-bit); linear in between
CIVIDIS = np.array([
    (0, 34, 78), (0, 40, 91), (0, 46, 106), (5, 51, 113), (26, 56, 111), (39, 62, 110),
    (50, 67, 109), (59, 73, 108), (67, 78, 108), (75, 84, 108), (83, 90, 109), (90, 95, 110),
    (97, 101, 111), (104, 106, 113), (111, 112, 115), (118, 118, 118), (125, 124, 120), (132, 130, 121),
    (140, 136, 120), (147, 142, 120), (155, 148, 118), (163, 154, 116), (171, 160, 114), (180, 167, 111),
    (188, 174, 108), (196, 180, 104), (205, 187, 99), (213, 194, 94), (222, 201, 88), (231, 209, 80),
    (240, 216, 70), (249, 224, 58), (254, 232, 56),
], dtype=np.float64)
#: Okabe-Ito vermillion: the outline colour
OUTLINE = (213, 94, 0)


def cividis(values: np.ndarray) -> np.ndarray:
    """RGB (float 0-255, shape ``values.shape + (3,)``) of ``values`` in [0, 1] (clipped)."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(CIVIDIS) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(CIVIDIS) - 2)
    t = (x - lo)[..., None]
    return (1 - t) * CIVIDIS[lo] + t * CIVIDIS[lo + 1]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or on the image border)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~inner


def render_overlay(
    image: np.ndarray,
    window: tuple[float, float],
    overlay: np.ndarray | None = None,
    outline: np.ndarray | None = None,
    *,
    opacity: float = 0.6,
) -> np.ndarray:
    """An RGB uint8 ``(rows, columns, 3)`` picture of ``image`` with ``overlay`` and ``outline``.

    Args:
        image: the frame in modality units ``(rows, columns)``.
        window: display window ``(centre, width)`` applied to ``image`` (linear, DICOM style).
        overlay: a map in [0, 1] (clipped), drawn in cividis with opacity ``opacity * value``.
        outline: a mask whose boundary is drawn in :data:`OUTLINE`.
    """
    image = np.asarray(image, dtype=np.float64)
    centre, width = float(window[0]), max(float(window[1]), 1e-6)
    grey = np.clip((image - (centre - width / 2)) / width, 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if overlay is not None:
        ov = np.asarray(overlay, dtype=np.float64)
        if ov.shape != image.shape:
            raise DicomError(f"overlay of shape {ov.shape} does not fit the frame {image.shape}")
        a = (np.clip(ov, 0.0, 1.0) * float(opacity))[..., None]
        rgb = (1 - a) * rgb + a * cividis(ov)
    if outline is not None:
        if np.shape(outline) != image.shape:
            raise DicomError(f"outline of shape {np.shape(outline)} does not fit the frame {image.shape}")
        rgb[_outline(outline)] = OUTLINE
    return np.round(rgb).astype(np.uint8)


def _frame_item(ds: Dataset, frame_number: int | None, name: str) -> Dataset | None:
    """``name``'s first item for one frame of an enhanced object (per-frame, else shared)."""
    if frame_number is None or "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    fg = ds.PerFrameFunctionalGroupsSequence[frame_number - 1]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    seq = fg.get(name) or shared.get(name)
    return seq[0] if seq else None


def source_frame(ds: Dataset, frame_number: int | None = None) -> np.ndarray:
    """The pixels of one source frame in modality units (rescale slope / intercept applied)."""
    if "PixelData" not in ds:
        raise DicomError(f"source {instance_uid(ds)} was read without pixel data")
    pixels = np.asarray(ds.pixel_array)
    n = int(ds.get("NumberOfFrames") or 1)
    if n > 1:
        if frame_number is None or not 1 <= frame_number <= n:
            raise DicomError(f"source {instance_uid(ds)} has {n} frames: give a frame_number 1-{n}")
        pixels = pixels[frame_number - 1]
    pvt = _frame_item(ds, frame_number, "PixelValueTransformationSequence") or ds
    slope = float(pvt.get("RescaleSlope") or 1.0)
    intercept = float(pvt.get("RescaleIntercept") or 0.0)
    return pixels.astype(np.float64) * slope + intercept


def _first(value: Any) -> float:
    """The first of a multi-valued number, or the number."""
    if isinstance(value, (str, bytes, int, float)):
        return float(value)
    return float(value[0])


def source_window(ds: Dataset, frame_number: int | None, image: np.ndarray) -> tuple[float, float]:
    """The source's first display window for the frame, else the 1st-99th percentile of ``image``."""
    voi = _frame_item(ds, frame_number, "FrameVOILUTSequence") or ds
    centre, width = voi.get("WindowCenter"), voi.get("WindowWidth")
    if centre is not None and width is not None:
        try:
            return _first(centre), _first(width)
        except (TypeError, ValueError, IndexError):
            pass
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def _patient_orientation(iop: Any) -> tuple[str, str]:
    """PatientOrientation letters of the row and column directions (the dominant axis of each)."""
    out = []
    for v in (np.asarray(iop[:3], float), np.asarray(iop[3:6], float)):
        axis = int(np.argmax(np.abs(v)))
        out.append((("R", "L"), ("A", "P"), ("F", "H"))[axis][int(v[axis] > 0)])  # LPS: +x left, +y posterior
    return out[0], out[1]


def build_overlay_sc(
    source: Dataset,
    identity: OutputIdentity,
    *,
    frame_number: int | None = None,
    overlay: np.ndarray | None = None,
    outline: np.ndarray | None = None,
    image: np.ndarray | None = None,
    window: tuple[float, float] | None = None,
    opacity: float = 0.6,
    equipment: Equipment = DEFAULT_EQUIPMENT,
    description: str = "Overlay of an algorithm output (not for diagnosis)",
) -> hd.sc.SCImage:
    """The Secondary Capture (not written): see :func:`write_overlay_sc`."""
    import highdicom as hd

    (source,) = prepare_sources([source])
    if image is None:
        image = source_frame(source, frame_number)
    image = np.asarray(image, dtype=np.float64)
    rows, cols = int(source.Rows), int(source.Columns)
    if image.shape != (rows, cols):
        raise DicomError(f"image of shape {image.shape} does not fit the source's {rows}x{cols} frames")
    rgb = render_overlay(image, window or source_window(source, frame_number, image), overlay, outline,
                         opacity=opacity)
    orientation = _frame_item(source, frame_number, "PlaneOrientationSequence") or source
    measures = _frame_item(source, frame_number, "PixelMeasuresSequence") or source
    iop = orientation.get("ImageOrientationPatient")
    spacing = measures.get("PixelSpacing")
    kwargs = identity.sop_kwargs()
    if identity.series_description is None:
        kwargs["series_description"] = "Overlay"
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=_patient_orientation(iop) if iop is not None else ("L", "P"),
            pixel_spacing=tuple(float(v) for v in spacing) if spacing is not None else None,
            manufacturer=equipment.manufacturer,
            manufacturer_model_name=equipment.model_name,
            software_versions=equipment.software_versions,
            device_serial_number=equipment.device_serial_number,
            institution_name=equipment.institution_name,
            transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian
            **kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise DicomError(f"cannot build the secondary capture: {exc}") from exc
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        ref.ReferencedFrameNumber = frame_number
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = description[:1024]
    sc.ImageComments = description[:10240]
    sc.BurnedInAnnotation = "NO"
    copy_series_anatomy(source, sc, unknown_laterality=True)
    make_reproducible(sc, identity)
    return sc


def write_overlay_sc(target: Path | str, source: Dataset, identity: OutputIdentity, **options: Any) -> hd.sc.SCImage:
    """Write one RGB Secondary Capture of a source frame with an overlay (atomically); return it.

    Args:
        target: output file.
        source: the source instance; with pixel data unless ``image`` is given.
        identity: UIDs, series number and creation time (one SOP instance per frame written).
        **options: ``frame_number`` (1-based, for multi-frame sources), ``overlay`` (map in [0, 1],
            ``(rows, columns)``), ``outline`` (mask), ``image`` (the frame in modality units, instead
            of decoding the source), ``window`` ((centre, width); default the source's first window),
            ``opacity``, ``equipment``, ``description``.

    Raises:
        DicomError: overlay / outline / image that do not fit the frame, or a source without pixels.
    """
    sc = build_overlay_sc(source, identity, **options)
    save_dataset(sc, target)
    return sc
