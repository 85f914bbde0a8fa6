"""Source frames and medpipe volumes: the one place that maps between them.

Two ways from a volume back to DICOM frames:

* **Layout** (:func:`slice_to_frame`, :func:`volume_to_frames` and their inverses
  :func:`frame_to_slice`, :func:`frames_to_volume`): ingest stores frame ``k`` as
  ``volume[:, :, k] == frame[::-1, :].T`` (``[column, flipped row, slice]``, see
  :mod:`medpipe.dicom.geometry`). These functions are that layout and its exact inverse; nothing
  else in medpipe spells out the flips and transposes. They are right only for a volume that ingest
  did not resample, with its slices in the order of the sidecar's ``SourceSOPInstanceUIDs``.
* **World space** (:func:`sample_frames`): a volume on *any* RAS grid (data + voxel -> RAS
  affine) is sampled at the centre of every pixel of every source frame, described by a
  :class:`FrameGeometry` read from the source datasets (:func:`frame_geometries`). This puts a
  prediction back onto the source series' own frames even where ingest resampled (gantry tilt,
  uneven spacing, missing slices) or the model ran on another grid. On the source series' own
  unresampled grid it gives exactly what :func:`volume_to_frames` gives.

Frame positions that are within ingest's slice-gap tolerance (:data:`~medpipe.dicom.geometry.GAP_REL_TOL`
of a voxel) of a voxel centre are taken to be that voxel centre, so sampling on a grid that ingest
accepted as regular is exact for linear interpolation as well as for nearest neighbour.

Only numpy and pydicom are imported at module level (ingest imports this module); scipy is imported
by the linear sampler when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from medpipe.dicom.geometry import GAP_REL_TOL, voxel_to_world
from medpipe.errors import DicomError

# -- layout ------------------------------------------------------------------------------------------


def frame_to_slice(frame: np.ndarray) -> np.ndarray:
    """A frame ``(rows, columns, ...)`` as a volume slice ``[column, flipped row, ...]`` (a view)."""
    return np.swapaxes(frame[::-1], 0, 1)


def slice_to_frame(sl: np.ndarray) -> np.ndarray:
    """A volume slice ``[column, flipped row, ...]`` as a frame ``(rows, columns, ...)`` (a view)."""
    return np.swapaxes(sl, 0, 1)[::-1]


def frames_to_volume(frames: np.ndarray) -> np.ndarray:
    """Frames ``(n, rows, columns, ...)`` as a volume ``[column, flipped row, n, ...]`` (a view)."""
    return np.moveaxis(frames[:, ::-1], (0, 1, 2), (2, 1, 0))


def volume_to_frames(volume: np.ndarray) -> np.ndarray:
    """A volume ``[column, flipped row, k, ...]`` as frames ``(k, rows, columns, ...)`` (a view).

    The exact inverse of ingest's layout: frame ``k`` of the result is the DICOM frame that ingest
    put into slice ``k`` of an unresampled volume.
    """
    return np.moveaxis(volume, (0, 1, 2), (2, 1, 0))[:, ::-1]


# -- per-frame geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameGeometry:
    """Where one source frame lies in patient space.

    ``frame_number`` is the 1-based frame of a multi-frame instance, ``None`` for a single-frame
    instance. ``position`` is ImagePositionPatient (LPS, mm, centre of the first stored pixel),
    ``orientation`` ImageOrientationPatient, ``pixel_spacing`` DICOM PixelSpacing
    ``[row spacing, column spacing]``.
    """

    sop_instance_uid: str
    frame_number: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    def affine(self) -> np.ndarray:
        """Voxel -> RAS affine of this frame as a one-slice volume in ingest's layout.

        Pixel ``(row r, column c)`` is voxel ``(c, rows - 1 - r, 0)``; see :func:`frame_to_slice`.
        """
        return voxel_to_world(self.orientation, self.position, self.pixel_spacing, 1.0, self.rows)

    def pixel_centres(self) -> np.ndarray:
        """RAS coordinates (mm) of every pixel centre, shape ``(rows, columns, 3)``."""
        a = self.affine()
        r, c = np.meshgrid(np.arange(self.rows, dtype=float), np.arange(self.columns, dtype=float), indexing="ij")
        vox = np.stack([c, self.rows - 1.0 - r, np.zeros_like(r)], axis=-1)
        return vox @ a[:3, :3].T + a[:3, 3]


def _floats(value: object, n: int, what: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = ()
    if len(out) != n or not all(np.isfinite(out)):
        raise DicomError(f"{where}: {what} must hold {n} numbers, got {value!r}")
    return out


def instance_uid(ds: Dataset) -> str:
    """SOP Instance UID of ``ds``; the file meta's copy when the dataset's own is blank."""
    uid = str(ds.get("SOPInstanceUID") or "")
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = str(meta.get("MediaStorageSOPInstanceUID") or "") if meta is not None else ""
    return uid


def frame_geometries(datasets: Sequence[Dataset]) -> list[FrameGeometry]:
    """One :class:`FrameGeometry` per frame of ``datasets``, in the order given.

    A classic single-frame instance gives one (``frame_number`` ``None``); an enhanced multi-frame
    instance gives one per frame, in frame order, from its per-frame and shared functional groups
    (Plane Position, Plane Orientation, Pixel Measures). Datasets read with
    ``stop_before_pixels=True`` are enough.

    Raises:
        DicomError: a dataset without plane geometry, a Siemens mosaic (its tiles are not DICOM
            frames) or a multi-frame object without functional groups.
    """
    out: list[FrameGeometry] = []
    for ds in datasets:
        uid = instance_uid(ds)
        where = f"SOP instance {uid or '(no UID)'}"
        if not uid:
            raise DicomError("source dataset has no SOP Instance UID")
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        if rows <= 0 or cols <= 0:
            raise DicomError(f"{where}: no Rows / Columns")
        if "PerFrameFunctionalGroupsSequence" in ds:
            out.extend(_enhanced(ds, uid, rows, cols, where))
            continue
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "MOSAIC" in image_type:
            raise DicomError(f"{where}: a Siemens mosaic holds many slices in one frame; "
                             "DICOM results cannot be written on its frames")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise DicomError(f"{where}: multi-frame object without per-frame functional groups")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise DicomError(f"{where}: no image plane geometry (ImagePositionPatient / "
                             "ImageOrientationPatient / PixelSpacing)")
        out.append(FrameGeometry(
            uid, None,
            _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
            _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),  # type: ignore[arg-type]
            _floats(ds.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
            rows, cols,
        ))
    return out


def _enhanced(ds: Dataset, uid: str, rows: int, cols: int, where: str) -> list[FrameGeometry]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    per_frame = ds.PerFrameFunctionalGroupsSequence
    n = int(ds.get("NumberOfFrames") or len(per_frame))
    if len(per_frame) != n:
        raise DicomError(f"{where}: {len(per_frame)} per-frame functional groups for {n} frames")

    def item(fg: Dataset, name: str) -> Dataset | None:
        seq = fg.get(name) or shared.get(name)
        return seq[0] if seq else None

    out = []
    for i, fg in enumerate(per_frame):
        pos, ori, meas = item(fg, "PlanePositionSequence"), item(fg, "PlaneOrientationSequence"), item(
            fg, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise DicomError(f"{where}: frame {i + 1} has no plane position / orientation / pixel spacing")
        out.append(FrameGeometry(
            uid, i + 1,
            _floats(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
            _floats(ori.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),  # type: ignore[arg-type]
            _floats(meas.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
            rows, cols,
        ))
    return out


def derived_frame_sources(ds: Dataset) -> list[tuple[str | None, int | None]]:
    """For each frame of a derived multi-frame object (SEG, Parametric Map): the source it lies on.

    ``(SOP Instance UID, frame number or None)`` from the frame's Derivation Image Sequence, or
    ``(None, None)`` where the object does not say. highdicom sorts such frames along the slice
    normal, so their order is not the order of the sources they were written from.
    """
    out: list[tuple[str | None, int | None]] = []
    for fg in ds.get("PerFrameFunctionalGroupsSequence") or []:
        derivation = fg.get("DerivationImageSequence") or []
        if derivation and derivation[0].get("SourceImageSequence"):
            src = derivation[0].SourceImageSequence[0]
            number = src.get("ReferencedFrameNumber")
            out.append((str(src.ReferencedSOPInstanceUID), int(number) if number else None))
        else:
            out.append((None, None))
    return out


def source_frame_index(frames: Sequence[FrameGeometry]) -> dict[tuple[str, int | None], int]:
    """``(SOP Instance UID, frame number)`` -> position in ``frames`` (the keys of :func:`derived_frame_sources`)."""
    return {(f.sop_instance_uid, f.frame_number): i for i, f in enumerate(frames)}


# -- sampling at frame pixels -------------------------------------------------------------------------

Interpolation = Literal["nearest", "linear"]


def _snap(coords: np.ndarray) -> np.ndarray:
    """Coordinates within ingest's gap tolerance of a voxel centre become that voxel centre."""
    near = np.rint(coords)
    return np.where(np.abs(coords - near) <= GAP_REL_TOL, near, coords)


def frame_voxel_coordinates(frame: FrameGeometry, affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates (in the grid of ``affine``) of every pixel centre of ``frame``, ``(3, rows, columns)``."""
    m = np.linalg.inv(np.asarray(affine, dtype=float)) @ frame.affine()  # frame voxel -> grid voxel
    r, c = np.meshgrid(np.arange(frame.rows, dtype=float), np.arange(frame.columns, dtype=float), indexing="ij")
    j = frame.rows - 1.0 - r
    return _snap(m[:3, 0, None, None] * c + m[:3, 1, None, None] * j + m[:3, 3, None, None])


def sample_frames(
    data: np.ndarray,
    affine: np.ndarray,
    frames: Sequence[FrameGeometry],
    *,
    interpolation: Interpolation = "nearest",
    fill: float = 0,
) -> np.ndarray:
    """Sample ``data`` (voxel -> RAS ``affine``) at every pixel centre of ``frames``.

    Args:
        data: ``(X, Y, Z)`` or ``(X, Y, Z, ...)`` (trailing axes, e.g. classes, are carried along).
        affine: 4x4 voxel -> RAS affine of ``data`` (any grid: ingest's, a model's, resampled).
        frames: where to sample, e.g. :func:`frame_geometries` of the source datasets.
        interpolation: ``"nearest"`` for label maps (dtype kept) or ``"linear"`` for probabilities
            and other maps (float32).
        fill: value of pixels that lie outside ``data`` (it must fit the output's dtype). A pixel
            is inside when it is within half a voxel of the grid (the voxel it falls into exists).

    Returns:
        ``(n_frames, rows, columns, ...)``; frame ``i`` lies on ``frames[i]``.

    Raises:
        DicomError: frames of different sizes (they cannot be stacked), or ``data`` is not 3D+.
    """
    data = np.asarray(data)
    if data.ndim < 3:
        raise DicomError(f"expected a 3D volume (plus optional trailing axes), got shape {data.shape}")
    if interpolation not in ("nearest", "linear"):
        raise DicomError(f"interpolation must be 'nearest' or 'linear', not {interpolation!r}")
    if not frames:
        raise DicomError("no frames to sample")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) != 1:
        raise DicomError(f"source frames have different sizes {sorted(sizes)}: sample each size separately")
    rows, cols = next(iter(sizes))
    extra = data.shape[3:]
    dtype = data.dtype if interpolation == "nearest" else np.dtype(np.float32)
    try:
        if dtype.kind in "biu" and np.asarray(fill, dtype=dtype) != fill:
            raise ValueError
    except (OverflowError, ValueError):
        raise DicomError(f"fill value {fill!r} does not fit the {dtype} output") from None
    out = np.empty((len(frames), rows, cols, *extra), dtype=dtype)
    shape = np.asarray(data.shape[:3])[:, None, None]
    flat = data.reshape(*data.shape[:3], -1)  # trailing axes as one (a view when possible)
    for n, frame in enumerate(frames):
        coords = frame_voxel_coordinates(frame, affine)
        idx = np.floor(coords + 0.5).astype(np.int64)  # nearest voxel (halves round up)
        inside = np.all((idx >= 0) & (idx < shape), axis=0)
        target = out[n].reshape(rows, cols, -1)
        target[...] = fill
        if not inside.any():
            continue
        if interpolation == "nearest":
            i, j, k = (a[inside] for a in idx)
            target[inside] = flat[i, j, k]
        else:
            target[inside] = _linear(flat, coords[:, inside])
    return out


def _linear(flat: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear values of ``flat`` (X, Y, Z, C) at voxel ``points`` (3, n) inside the grid's half-voxel border."""
    from scipy import ndimage

    hi = np.asarray(flat.shape[:3], dtype=float)[:, None] - 1.0
    pts = np.clip(points, 0.0, hi)  # the border half voxel takes the edge voxel's value
    src = flat.astype(np.float32, copy=False)
    return np.stack(
        [ndimage.map_coordinates(src[..., c], pts, order=1, mode="nearest", prefilter=False)
         for c in range(flat.shape[3])],
        axis=-1,
    )


def frames_to_grid(frame_pixels: np.ndarray, frames: Sequence[FrameGeometry], affine: np.ndarray,
                   shape: Sequence[int], *, fill: float = 0, reach: float | None = None) -> np.ndarray:
    """Values of parallel ``frames`` at every voxel centre of a grid (nearest neighbour): the inverse of
    :func:`sample_frames` for a label map.

    Each voxel takes the pixel nearest to it on the nearest frame along the frames' normal, when that
    frame lies within half the frame spacing (the first and last frame: within half their neighbour's
    spacing) and the pixel within half a pixel; else ``fill``. ``reach`` (mm) replaces the half spacing
    for every frame: give it when ``frames`` are a subset of a stack (a SEG omits empty frames), so that
    a voxel between two distant frames is not taken from either. Frames may be sheared (a gantry-tilted
    stack: each frame has its own in-plane position) or unevenly spaced; they must share one
    orientation and size.

    Args:
        frame_pixels: ``(n_frames, rows, columns)``; frame ``i`` lies on ``frames[i]``.
        frames: their geometry (e.g. :func:`frame_geometries`).
        affine: 4x4 voxel -> RAS affine of the grid.
        shape: the grid's ``(X, Y, Z)``.

    Raises:
        DicomError: frames of different orientations or sizes, or pixels that do not fit ``frames``.
    """
    from medpipe.dicom.geometry import slice_normal

    frame_pixels = np.asarray(frame_pixels)
    if not frames or frame_pixels.shape[0] != len(frames):
        raise DicomError(f"{frame_pixels.shape[0]} frames of pixels for {len(frames)} frame geometries")
    iops = np.array([f.orientation for f in frames], dtype=float)
    if np.abs(iops - iops[0]).max() > 1e-4 or len({(f.rows, f.columns, *f.pixel_spacing) for f in frames}) != 1:
        raise DicomError("frames of different orientations, sizes or pixel spacings cannot be placed as one stack")
    rows, cols = frames[0].rows, frames[0].columns
    if frame_pixels.shape[1:3] != (rows, cols):
        raise DicomError(f"pixels of shape {frame_pixels.shape[1:3]} do not fit frames of {rows}x{cols}")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = slice_normal(iops[0])
    row_spacing, col_spacing = frames[0].pixel_spacing
    positions = np.array([f.position for f in frames], dtype=float)  # LPS
    dist = positions @ normal
    order = np.argsort(dist)
    d_sorted = dist[order]
    gaps = np.diff(d_sorted) if len(d_sorted) > 1 else np.array([1.0])
    half_before = np.concatenate([[gaps[0]], gaps]) / 2
    half_after = np.concatenate([gaps, [gaps[-1]]]) / 2
    if reach is not None:
        half_before = half_after = np.full(len(d_sorted), float(reach))
    a = np.asarray(affine, dtype=float)
    out = np.full(tuple(int(s) for s in shape), fill, dtype=frame_pixels.dtype)
    ii, jj = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), indexing="ij")
    lps = np.diag([-1.0, -1.0, 1.0])
    for k in range(int(shape[2])):
        ras = a[:3, 0, None, None] * ii + a[:3, 1, None, None] * jj + a[:3, 2, None, None] * k + a[:3, 3, None, None]
        p = np.tensordot(lps, ras, axes=1)  # (3, X, Y) LPS
        d = np.tensordot(normal, p, axes=1)
        s = np.clip(np.searchsorted(d_sorted, d), 0, len(d_sorted) - 1)
        prev = np.clip(s - 1, 0, len(d_sorted) - 1)
        nearest = np.where(np.abs(d - d_sorted[prev]) < np.abs(d - d_sorted[s]), prev, s)
        offset = d - d_sorted[nearest]
        ok = (offset >= -half_before[nearest] - 1e-6) & (offset <= half_after[nearest] + 1e-6)
        f = order[nearest]
        rel = p - np.moveaxis(positions[f], -1, 0)  # from each voxel's frame origin, (3, X, Y)
        c = np.rint(np.tensordot(row_dir, rel, axes=1) / col_spacing).astype(np.int64)
        r = np.rint(np.tensordot(col_dir, rel, axes=1) / row_spacing).astype(np.int64)
        ok &= (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        out[..., k][ok] = frame_pixels[f[ok], r[ok], c[ok]]
    return out
