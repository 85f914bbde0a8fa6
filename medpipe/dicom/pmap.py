"""DICOM Parametric Map of a float map (e.g. a Grad-CAM saliency 0..1) on the source series' frames.

``values`` is given on the source frames like a SEG's masks: ``(frames, rows, columns)``, frame ``i``
on ``sources[i]`` (or frame ``i + 1`` of one multi-frame source); get it from a map on any grid with
``sample_frames(map, affine, frame_geometries(sources), interpolation="linear")``.

Two encodings:

* ``"float32"`` (default): 32-bit Float Pixel Data, real-world value = stored value (identity
  mapping); values read back exactly as written.
* ``"uint16"``: 16-bit integers over ``value_range`` (``stored = round((v - lo) / (hi - lo) * 65535)``,
  real-world value = ``stored * slope + lo``); within half a step (``(hi - lo) / 131070``) of the
  values written, values outside ``value_range`` clipped to it. For viewers without float support.

The Real World Value Mapping names the quantity (default DCM 130404 "Saliency") and its unit (default
UCUM ``1``, no units); the VOI window spans ``value_range``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from medpipe.dicom.frames import FrameGeometry, derived_frame_sources, source_frame_index
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
from medpipe.errors import DicomError

if TYPE_CHECKING:
    import highdicom as hd

SALIENCY = Code("130404", "DCM", "Saliency")
NO_UNITS = Code("1", "UCUM", "no units")
UINT16_MAX = 65535


def build_parametric_map(
    sources: Sequence[Dataset],
    values: np.ndarray,
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    *,
    quantity: CodeLike = SALIENCY,
    unit: CodeLike = NO_UNITS,
    value_range: tuple[float, float] = (0.0, 1.0),
    encoding: Literal["float32", "uint16"] = "float32",
    lut_label: str = "SALIENCY",
    lut_explanation: str | None = None,
    equipment: Equipment = DEFAULT_EQUIPMENT,
    content_label: str = "SALIENCY",
    content_description: str | None = None,
) -> hd.pm.ParametricMap:
    """The Parametric Map (not written): see :func:`write_parametric_map`."""
    import highdicom as hd

    sources = prepare_sources(sources)
    check_one_frame_per_position(sources)
    values = np.asarray(values)
    n = int(sources[0].get("NumberOfFrames") or 1) if len(sources) == 1 else len(sources)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if values.shape != (n, rows, cols):
        raise DicomError(f"map of shape {values.shape} does not fit {n} source frames of {rows}x{cols}")
    if values.dtype.kind not in "fiu" or not np.all(np.isfinite(values)):
        raise DicomError("the map must hold finite numbers")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise DicomError(f"value_range must be (low, high) with high > low, got {value_range}")
    if encoding == "float32":
        pixels = values.astype(np.float32)
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=lut_label, lut_explanation=lut_explanation or f"{as_code(quantity).meaning} ({algorithm.name})",
            unit=as_code(unit, "unit"), value_range=(lo, hi), slope=1.0, intercept=0.0,
            quantity_definition=as_code(quantity, "quantity"),
        )
        window = hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=hi - lo)
    elif encoding == "uint16":
        scaled = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
        pixels = np.round(scaled * UINT16_MAX).astype(np.uint16)
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=lut_label, lut_explanation=lut_explanation or f"{as_code(quantity).meaning} ({algorithm.name})",
            unit=as_code(unit, "unit"), value_range=(0, UINT16_MAX), slope=(hi - lo) / UINT16_MAX, intercept=lo,
            quantity_definition=as_code(quantity, "quantity"),
        )
        window = hd.VOILUTTransformation(window_center=UINT16_MAX / 2, window_width=UINT16_MAX)
    else:
        raise DicomError(f"encoding must be 'float32' or 'uint16', not {encoding!r}")
    kwargs = identity.sop_kwargs()
    if identity.series_description is None:
        kwargs["series_description"] = f"MAP {algorithm.name}"[:64]
    try:
        pm = hd.pm.ParametricMap(
            source_images=list(sources),
            pixel_array=pixels,
            manufacturer=equipment.manufacturer,
            manufacturer_model_name=equipment.model_name,
            software_versions=equipment.software_versions,
            device_serial_number=equipment.device_serial_number,
            institution_name=equipment.institution_name,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            content_label=content_label,
            content_description=content_description or f"{as_code(quantity).meaning} map by {algorithm.name}"[:64],
            **kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise DicomError(f"cannot build the parametric map: {exc}") from exc
    copy_series_anatomy(sources[0], pm, unknown_laterality=True)
    make_reproducible(pm, identity)
    return pm


def write_parametric_map(
    target: Path | str,
    sources: Sequence[Dataset],
    values: np.ndarray,
    algorithm: AlgorithmSpec,
    identity: OutputIdentity,
    **options: Any,
) -> hd.pm.ParametricMap:
    """Write a Parametric Map of per-frame ``values`` on ``sources`` to ``target`` (atomically); return it.

    Args:
        target: output file.
        sources: the source series' datasets (headers suffice), in the order of ``values``' frames.
        values: ``(frames, rows, columns)`` real-world values.
        algorithm: the model / method that made the map.
        identity: UIDs, series number and creation time.
        **options: ``quantity`` (code, default DCM "Saliency"), ``unit`` (code, default UCUM "1"),
            ``value_range`` ((0, 1)), ``encoding`` ("float32" | "uint16"), ``lut_label``,
            ``lut_explanation``, ``equipment``, ``content_label``, ``content_description``.

    Raises:
        DicomError: a map that does not fit the sources, non-finite values, an empty value range.
    """
    pm = build_parametric_map(sources, values, algorithm, identity, **options)
    save_dataset(pm, target)
    return pm


def read_parametric_map(pm: Dataset | Path | str, frames: Sequence[FrameGeometry]) -> np.ndarray:
    """Real-world values of a Parametric Map on the source ``frames``: ``(frames, rows, columns)`` float64.

    The inverse of :func:`write_parametric_map`: each map frame goes back onto the source frame it
    references, with its Real World Value Mapping (the first) applied; source frames the map does not
    cover are NaN.

    Raises:
        DicomError: a map frame that references none of ``frames``, or a map without a mapping.
    """
    import pydicom

    ds = pm if isinstance(pm, Dataset) else pydicom.dcmread(str(pm))
    stored = np.asarray(ds.pixel_array, dtype=np.float64)
    if stored.ndim == 2:
        stored = stored[None]
    shared = ds.SharedFunctionalGroupsSequence[0]
    where = source_frame_index(frames)
    out = np.full((len(frames), frames[0].rows, frames[0].columns), np.nan)
    for i, (fg, key) in enumerate(zip(ds.PerFrameFunctionalGroupsSequence, derived_frame_sources(ds))):
        if key not in where:
            raise DicomError(f"map frame {i + 1} lies on source {key[0]} frame {key[1]}, not among the given frames")
        seq = fg.get("RealWorldValueMappingSequence") or shared.get("RealWorldValueMappingSequence")
        if not seq:
            raise DicomError("parametric map without a Real World Value Mapping")
        m = seq[0]
        out[where[key]] = stored[i] * float(m.RealWorldValueSlope) + float(m.RealWorldValueIntercept)
    return out
