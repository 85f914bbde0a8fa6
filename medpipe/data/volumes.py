"""Volumes on one grid: compare grids, resample in world space, turn a DICOM SEG into a label map.

Everything here works on NIfTI volumes written by ``medpipe ingest`` (voxel -> RAS affine, the array
laid out as dcm2niix writes it: ``[column, flipped row, slice]``) and needs numpy, scipy, nibabel and
highdicom only (no torch).

Two ways to put a SEG on its reference volume, both exact on an unresampled volume:

* **by source instance** (preferred): the SEG frames are looked up by the SOP Instance UIDs that
  ingest lists in slice order in the reference volume's sidecar (``SourceSOPInstanceUIDs``), and the
  SEG's own plane positions are checked against the reference affine;
* **in world space** (fallback: the reference was resampled by ingest, is multi-frame, or the SEG
  references other instances): ``highdicom``'s SEG volume and its affine, nearest-neighbour
  resampled onto the reference grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from medpipe.dicom.frames import frames_to_volume
from medpipe.dicom.geometry import LPS_TO_RAS
from medpipe.errors import DicomError
from medpipe.io import atomic_path


@dataclass(frozen=True)
class GridSpec:
    """The voxel grid of a 3D volume: shape and voxel -> RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def same_as(self, other: GridSpec, tol: float = 1e-3) -> bool:
        """Same shape and the same affine to ``tol`` (mm for the translation, relative for the axes)."""
        if tuple(self.shape) != tuple(other.shape):
            return False
        scale = max(float(self.spacing.max()), 1.0)
        return bool(np.allclose(self.affine, other.affine, rtol=0.0, atol=tol * scale))


def read_grid(path: Path | str) -> GridSpec:
    """The grid of a NIfTI file (header only: no voxel data is read)."""
    import nibabel as nib

    img = cast(nib.Nifti1Image, nib.load(str(path)))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {img.shape}")
    nx, ny, nz = (int(s) for s in img.shape)
    return GridSpec((nx, ny, nz), np.asarray(img.affine, dtype=np.float64))


def read_voxels(path: Path | str) -> np.ndarray:
    """The voxel array of a NIfTI file as stored (no scaling applied beyond nibabel's ``dataobj``)."""
    import nibabel as nib

    img: Any = nib.load(str(path))
    return np.asarray(img.dataobj)


def resample_to_grid(data: np.ndarray, affine: np.ndarray, target: GridSpec, *, order: int,
                     cval: float | None = None) -> np.ndarray:
    """Resample ``data`` (3D, voxel -> RAS ``affine``) onto ``target`` in world space.

    ``order`` 1: trilinear (images; float32 out), 0: nearest neighbour (label maps; dtype kept).
    Points outside the source are ``cval`` (default: the source minimum for images, 0 for labels).
    """
    from scipy import ndimage

    m = np.linalg.inv(affine) @ target.affine  # target voxel -> source voxel
    if order == 0:
        src = data
        fill = 0 if cval is None else cval
    else:
        src = data.astype(np.float32, copy=False)
        fill = float(src.min()) if cval is None and src.size else (cval or 0.0)
    return ndimage.affine_transform(
        src, m[:3, :3], offset=m[:3, 3], output_shape=target.shape, order=order, mode="constant", cval=fill,
        prefilter=False,
    )


def write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``data`` with ``affine`` (sform = qform = scanner RAS) atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def label_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.uint8 if max_value < 256 else np.int16 if max_value < 32768 else np.int32)


def file_key(*paths: Path | str, extra: object = None) -> str:
    """A short hash of files' names, sizes and mtimes (and ``extra``): names outputs derived from them."""
    h = hashlib.sha256(repr(extra).encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:12]


# -- DICOM SEG -> label map --------------------------------------------------------------------------


class SegMismatch(ValueError):
    """A SEG that does not fit the reference volume (one-line reason)."""


@dataclass
class LabelMap:
    data: np.ndarray  # integer label map on the reference grid
    names: dict[int, str]  # label value -> segment label (lower case)
    method: str  # "source instances" or "world space"
    #: label value -> ``{"category": code, "type": code}`` (``{scheme, value, meaning}`` dicts) from the
    #: segment's coded concepts; values merged from several segments have none
    codes: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)


def read_seg(key: str) -> Any:
    """Read a DICOM SEG (file path, or an ingest key inside a zip) as a highdicom Segmentation."""
    import highdicom as hd
    import pydicom

    from medpipe.dicom.sources import open_key

    with open_key(key) as fh:
        ds = pydicom.dcmread(fh)
    return hd.seg.Segmentation.from_dataset(ds, copy=False)


def seg_to_labelmap(
    seg: Any,
    reference: GridSpec,
    sidecar: dict[str, Any],
    segments: dict[int, int] | None = None,
) -> LabelMap:
    """Convert a highdicom ``Segmentation`` to an integer label map on the ``reference`` grid.

    ``segments`` maps segment numbers to label values (default: each segment number is its value;
    segments not listed are left out). Where segments overlap, the later one in ``segments`` wins.
    ``sidecar`` is the reference volume's ingest sidecar (``SourceSOPInstanceUIDs``, ``Resampled``).

    Raises:
        SegMismatch: the SEG has no usable segment or does not lie on the reference volume.
    """
    numbers = [int(n) for n in seg.segment_numbers]
    mapping = {n: n for n in numbers} if segments is None else {int(k): int(v) for k, v in segments.items()}
    missing = sorted(set(mapping) - set(numbers))
    if missing:
        raise SegMismatch(f"SEG has no segment(s) {missing} (it has {numbers})")
    if any(v <= 0 for v in mapping.values()):
        raise SegMismatch("label values must be positive integers")
    names: dict[int, str] = {}
    codes: dict[int, dict[str, dict[str, str]]] = {}
    for n, value in mapping.items():  # segments merged into one value: their names joined, no codes
        desc = seg.get_segment_description(n)
        name = str(desc.segment_label).strip().lower()
        if value in names:
            names[value] = f"{names[value]} + {name}"
            codes.pop(value, None)
        else:
            names[value] = name
            codes[value] = segment_codes(desc)
    order = list(mapping)
    uids = sidecar.get("SourceSOPInstanceUIDs")
    exact = (
        isinstance(uids, list) and all(isinstance(u, str) for u in uids)
        and len(uids) == reference.shape[2] and not sidecar.get("Resampled")
        and "SourceFrameNumbers" not in sidecar
    )
    if exact and isinstance(uids, list):
        try:
            return LabelMap(_by_source_instance(seg, uids, reference, order, mapping), names, "source instances",
                            codes)
        except KeyError:
            pass  # the SEG references other instances: place it in world space
    return LabelMap(_in_world_space(seg, reference, order, mapping), names, "world space", codes)


def segment_codes(desc: Any) -> dict[str, dict[str, str]]:
    """``{"category": code, "type": code}`` of a highdicom segment description (codes as
    ``{scheme, value, meaning}`` dicts, as a model package's ``segment_codes`` holds them)."""

    def code(c: Any) -> dict[str, str]:
        return {"scheme": str(c.scheme_designator), "value": str(c.value), "meaning": str(c.meaning)}

    return {"category": code(desc.segmented_property_category), "type": code(desc.segmented_property_type)}


def _frames_in_world_space(seg: Any, reference: GridSpec, mapping: dict[int, int]) -> np.ndarray:
    """A SEG whose frames are parallel planes but not a regular volume, placed frame by frame (nearest
    neighbour, :func:`medpipe.dicom.frames.frames_to_grid`); later segments win where segments overlap."""
    from medpipe.dicom.frames import frames_to_grid
    from medpipe.dicom.seg import read_seg_frames

    from medpipe.dicom.geometry import slice_normal

    frames = read_seg_frames(seg)
    out = np.zeros(reference.shape, dtype=label_dtype(max(mapping.values())))
    if not frames:
        return out
    # the stack's spacing from all frames (empty ones are omitted, so one segment's frames can have gaps)
    dist = np.unique(np.round([np.dot(f.geometry.position, slice_normal(f.geometry.orientation)) for f in frames], 4))
    gaps = np.diff(dist)
    reach = float(gaps[gaps > 1e-3].min()) / 2 if np.any(gaps > 1e-3) else None
    labelmap = bool(frames) and frames[0].segment_number == 0
    for n, value in mapping.items():
        mine = frames if labelmap else [f for f in frames if f.segment_number == n]
        if not mine:
            continue
        pixels = np.stack([(f.pixels == n) if labelmap else (f.pixels > 0) for f in mine])
        placed = frames_to_grid(pixels, [f.geometry for f in mine], reference.affine, reference.shape, reach=reach)
        out[placed] = value
    return out


def _combine(masks: np.ndarray, order: list[int], mapping: dict[int, int]) -> np.ndarray:
    """(..., n_segments) binary/fractional masks -> integer labels (later segments win)."""
    out = np.zeros(masks.shape[:-1], dtype=label_dtype(max(mapping.values())))
    for c, n in enumerate(order):
        out[masks[..., c] > 0] = mapping[n]
    return out


def _by_source_instance(seg: Any, uids: list[str], reference: GridSpec, order: list[int],
                        mapping: dict[int, int]) -> np.ndarray:
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=order, combine_segments=False,
        assert_missing_frames_are_empty=False,
    )  # (slices, rows, columns, segments), slice k on uids[k]
    nk, rows, cols = masks.shape[:3]
    if (cols, rows, nk) != tuple(reference.shape):
        raise SegMismatch(f"SEG frames are {rows}x{cols} on {nk} slices; the reference volume is "
                          f"{'x'.join(map(str, reference.shape))}")
    _check_positions(seg, uids, reference, rows)
    labels = _combine(masks, order, mapping)  # [k, row, column]
    return np.ascontiguousarray(frames_to_volume(labels))  # ingest's layout: [column, flipped row, k]


def _check_positions(seg: Any, uids: list[str], reference: GridSpec, rows: int) -> None:
    """The SEG frames' ImagePositionPatient must be where the reference grid puts their source slices."""
    slice_of = {u: k for k, u in enumerate(uids)}
    tol = 0.25 * float(reference.spacing.min())
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        try:
            ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        except (AttributeError, IndexError):
            return  # positions not recorded per frame: nothing to check
        k = slice_of.get(src)
        if k is None:
            continue
        ras = reference.affine @ np.array([0.0, rows - 1.0, float(k), 1.0])  # first pixel of slice k
        expected = (LPS_TO_RAS @ ras)[:3]  # RAS -> LPS (the matrix is its own inverse)
        if np.abs(np.asarray(ipp) - expected).max() > tol:
            raise SegMismatch(
                f"SEG frame on slice {k} is at {np.round(ipp, 2).tolist()} mm but the reference volume "
                f"puts that slice at {np.round(expected, 2).tolist()} mm"
            )


def _in_world_space(seg: Any, reference: GridSpec, order: list[int], mapping: dict[int, int]) -> np.ndarray:
    try:
        vol = seg.get_volume(segment_numbers=order, combine_segments=False)
    except (ValueError, RuntimeError) as exc:
        try:  # sheared (gantry tilt) or unevenly spaced frames: place every frame where it lies
            return _frames_in_world_space(seg, reference, mapping)
        except DicomError as why:
            raise SegMismatch(f"SEG frames do not form a regular volume ({exc}) and cannot be placed frame by frame "
                              f"({why})") from exc
    masks = np.asarray(vol.array)
    if masks.ndim == 3:  # one segment: no channel axis
        masks = masks[..., None]
    labels = _combine(masks, order, mapping)
    affine = LPS_TO_RAS @ np.asarray(vol.affine, dtype=np.float64)
    return resample_to_grid(labels, affine, reference, order=0)
