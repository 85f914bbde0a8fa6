"""Assemble a planned :class:`~medpipe.dicom.series.Stack` into a volume and write it as NIfTI.

Values are in modality units: each frame's RescaleSlope / RescaleIntercept is applied (or, when
one slope / intercept holds for the whole stack, stored as the NIfTI ``scl_slope`` / ``scl_inter``
so readers apply it exactly, as dcm2niix does). Stacks with uneven slice gaps or gantry tilt are
resampled onto a uniform orthogonal grid with linear interpolation.

Two ways to a NIfTI file: :func:`build_volume` + :func:`write_nifti` hold the whole volume in memory
(needed to resample it), and :func:`stream_volume` writes every other stack straight from its source
files into the output, slice by slice on several threads, keeping only the three planes the preview
shows. Both write the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.dicom.frames import frame_to_slice
from medpipe.dicom.geometry import voxel_to_world
from medpipe.dicom.header import InstanceHeader
from medpipe.dicom.series import FrameRef, Stack
from medpipe.dicom.sources import key_path, open_key
from medpipe.io import atomic_path, gzip_file, write_text_atomic


class FrameReadError(Exception):
    """Pixel data of one file could not be read; ``key`` names the file."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


class PixelReadErrors(Exception):
    """Pixel data of some files of a stack could not be read (``errors``, one per file)."""

    def __init__(self, errors: list[FrameReadError]) -> None:
        super().__init__(f"{len(errors)} file(s) with unreadable pixel data")
        self.errors = errors


@dataclass
class Volume:
    data: np.ndarray  # [i, j, k] or [i, j, k, t]; stored integers when ``scale`` is set
    affine: np.ndarray  # voxel -> RAS
    scale: tuple[float, float] | None  # (slope, intercept) to store in the NIfTI header, else real values
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


@dataclass(frozen=True)
class Layout:
    """A volume before its pixels are read: shape, stored type, scaling, grid (see :func:`layout`)."""

    shape: tuple[int, ...]  # (i, j, k) or (i, j, k, t)
    dtype: np.dtype
    scale: tuple[float, float] | None
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _stored_dtype(h: InstanceHeader) -> np.dtype:
    kind = "i" if h.pixel_representation else "u"
    return np.dtype(f"<{kind}{h.bits_allocated // 8}")


def _fix_bits(arr: np.ndarray, h: InstanceHeader) -> np.ndarray:
    """Mask unused high bits, and sign-extend signed values stored in fewer bits."""
    unused = h.bits_allocated - h.bits_stored
    if unused <= 0 or h.bits_allocated not in (8, 16, 32):
        return arr
    if h.pixel_representation:
        return (arr << unused) >> unused
    return arr & np.array((1 << h.bits_stored) - 1, dtype=arr.dtype)


def read_pixels(key: str, h: InstanceHeader) -> np.ndarray:
    """All frames of one file as stored integers, shape (frames, rows, columns)."""
    n = h.n_frames
    try:
        if h.pixel_offset is not None:
            dtype = _stored_dtype(h)
            count = n * h.rows * h.columns
            path = key_path(key)
            if path is None:  # a zip member
                with open_key(key) as fh:
                    fh.seek(h.pixel_offset)
                    buf = fh.read(count * dtype.itemsize)
                if len(buf) != count * dtype.itemsize:
                    raise ValueError(f"pixel data has {len(buf) // dtype.itemsize} of {count} values")
                arr = np.frombuffer(buf, dtype=dtype, count=count)
            else:
                arr = np.fromfile(path, dtype=dtype, count=count, offset=h.pixel_offset)
            if arr.size != count:
                raise ValueError(f"pixel data has {arr.size} of {count} values")
            arr = _fix_bits(arr.reshape(n, h.rows, h.columns), h)
        else:
            import pydicom

            with open_key(key) as fh:
                ds = pydicom.dcmread(fh, force=True)  # headers were validated by the scan
                arr = ds.pixel_array
            arr = arr.reshape(n, h.rows, h.columns)
    except FrameReadError:
        raise
    except Exception as exc:  # decoders raise many types on corrupt data
        raise FrameReadError(key, f"pixel data unreadable: {type(exc).__name__}: {exc}") from exc
    return arr


def _frame_array(pixels: np.ndarray, ref: FrameRef) -> np.ndarray:
    """The 2D stored array (rows, columns) of one frame / mosaic tile."""
    h = ref.header
    if h.mosaic:
        _, tr, tc = h.mosaic
        grid = h.columns // tc
        r, c = divmod(ref.frame.index, grid)
        return pixels[0, r * tr : (r + 1) * tr, c * tc : (c + 1) * tc]
    return pixels[ref.frame.index]


def _fill(stack: Stack, data: np.ndarray, rescale: bool) -> None:
    """Read every file of ``stack`` once and put its frames straight into ``data[i, j, k, t]``.

    ``rescale``: apply each frame's own slope / intercept (``data`` is float32 then).
    """
    where: dict[str, list[tuple[int, int, FrameRef]]] = defaultdict(list)
    for k, row in enumerate(stack.grid):
        for t, ref in enumerate(row):
            where[ref.key].append((k, t, ref))
    errors: list[FrameReadError] = []
    for key, items in where.items():
        try:
            pixels = read_pixels(key, items[0][2].header)
        except FrameReadError as exc:
            errors.append(exc)
            continue
        for k, t, ref in items:
            frame = frame_to_slice(_frame_array(pixels, ref))  # [column, flipped row], see geometry
            if rescale:
                data[:, :, k, t] = frame * np.float32(ref.frame.slope) + np.float32(ref.frame.intercept)
            else:
                data[:, :, k, t] = frame
    if errors:
        raise PixelReadErrors(errors)


def _resample_slices(slices: np.ndarray, stack: Stack) -> np.ndarray:
    """Resample [i, j, k] slices of a tilted or unevenly spaced stack onto a uniform orthogonal grid."""
    from scipy import ndimage

    geo = stack.geometry
    assert geo is not None  # planned stacks that resample always have geometry
    spacing_r, spacing_c = stack.grid[0][0].frame.spacing  # row spacing (j), column spacing (i)
    # j runs against the column cosine (rows are flipped): an offset along it shifts j the other way
    fill = float(slices.min())
    slices = slices.astype(np.float32, copy=False)  # interpolate real values, not rounded integers
    shifted = slices
    if np.any(np.abs(geo.inplane_offsets) > 1e-3):
        shifted = np.empty_like(slices)
        for k in range(slices.shape[2]):
            off_row, off_col = geo.inplane_offsets[k]  # mm along the row / column cosines
            shifted[:, :, k] = ndimage.shift(
                slices[:, :, k], (off_row / spacing_c, -off_col / spacing_r), order=1, mode="constant", cval=fill
            )
    n_out = int(round(geo.distances[-1] / geo.spacing)) + 1
    targets = np.arange(n_out) * geo.spacing
    out = np.empty(slices.shape[:2] + (n_out,), dtype=np.float32)
    d = geo.distances
    for m, z in enumerate(targets):
        s = int(np.clip(np.searchsorted(d, z, side="right") - 1, 0, len(d) - 2))
        w = float(np.clip((z - d[s]) / (d[s + 1] - d[s]), 0.0, 1.0))
        out[:, :, m] = (1 - w) * shifted[:, :, s] + w * shifted[:, :, s + 1]
    return out


def _thickness(value: Any) -> float:
    """SliceThickness as the step of a single-slice volume: 1 mm when absent or unusable."""
    try:
        x = float(value or 1.0)
    except (TypeError, ValueError, OverflowError):
        return 1.0
    return x if 0 < x < 1e5 and math.isfinite(x) else 1.0


def _scale_and_dtype(stack: Stack) -> tuple[tuple[float, float] | None, np.dtype]:
    scales = {(ref.frame.slope, ref.frame.intercept) for row in stack.grid for ref in row}
    if len(scales) == 1:
        return next(iter(scales)), np.result_type(*{_stored_dtype(ref.header) for row in stack.grid for ref in row})
    return None, np.dtype(np.float32)


def _frame_size(stack: Stack) -> tuple[int, int]:
    """(rows, columns) of one frame of the stack (a mosaic tile for a mosaic)."""
    h = stack.grid[0][0].header
    return (h.mosaic[1], h.mosaic[2]) if h.mosaic else (h.rows, h.columns)


def layout(stack: Stack) -> Layout:
    """Shape, stored type, scaling and affine of the volume of a planned stack that is not resampled."""
    if stack.resample:
        raise ValueError("a resampled stack has no layout before its pixels are read: use build_volume")
    nk, nt = stack.n_slices, stack.n_times
    first = stack.grid[0][0]
    iop, spacing = first.frame.iop, first.frame.spacing
    rows, cols = _frame_size(stack)
    scale, dtype = _scale_and_dtype(stack)
    geo = stack.geometry
    if nk == 1:
        step = _thickness(first.header.meta.get("SliceThickness"))
    else:
        if geo is None:
            raise ValueError("a stack of several slices without geometry")
        step = float(geo.distances[-1]) / (nk - 1)
    step_vec = geo.normal * step if geo is not None else step
    affine = voxel_to_world(iop, first.frame.ipp, spacing, step_vec, rows)
    shape = (cols, rows, nk) + ((nt,) if nt > 1 else ())
    return Layout(shape, np.dtype(dtype), scale, affine, (float(spacing[1]), float(spacing[0]), float(step)))


def build_volume(stack: Stack) -> Volume:
    """Read, order, rescale and (if needed) resample the pixels of a planned stack.

    One slope / intercept for the whole stack: the stored integers are kept and the pair goes into
    the NIfTI header (as dcm2niix does; exact, and half the size of float32). Per-frame pairs that
    differ: float32 values in modality units. The array is Fortran-ordered, as NIfTI stores it.

    Raises:
        PixelReadErrors: one :class:`FrameReadError` per file whose pixels could not be read.
    """
    nk, nt = stack.n_slices, stack.n_times
    rows, cols = _frame_size(stack)
    if not stack.resample:
        lay = layout(stack)
        data = np.empty((cols, rows, nk, nt), dtype=lay.dtype, order="F")
        _fill(stack, data, rescale=lay.scale is None)
        return Volume(data[..., 0] if nt == 1 else data, lay.affine, lay.scale, lay.spacing)
    first = stack.grid[0][0]
    iop, spacing = first.frame.iop, first.frame.spacing
    scale, dtype = _scale_and_dtype(stack)
    data = np.empty((cols, rows, nk, nt), dtype=dtype, order="F")
    _fill(stack, data, rescale=scale is None)

    geo = stack.geometry
    if nk == 1:
        step: float = _thickness(first.header.meta.get("SliceThickness"))
    elif stack.resample:
        assert geo is not None
        if scale is not None:  # resampling interpolates real values
            data = data.astype(np.float32) * np.float32(scale[0]) + np.float32(scale[1])
            scale = None
        data = np.asfortranarray(np.stack([_resample_slices(data[..., t], stack) for t in range(nt)], axis=-1))
        step = geo.spacing
    else:
        assert geo is not None
        step = float(geo.distances[-1]) / (nk - 1)
    step_vec = geo.normal * step if geo is not None else step
    affine = voxel_to_world(iop, first.frame.ipp, spacing, step_vec, rows)
    if nt == 1:
        data = data[..., 0]
    return Volume(data, affine, scale, (float(spacing[1]), float(spacing[0]), float(step)))


def _nifti_image(data: Any, affine: np.ndarray, scale: tuple[float, float] | None, tr_seconds: float | None):  # type: ignore[no-untyped-def]
    """The NIfTI-1 image medpipe writes: sform and qform = scanner RAS, mm / s, the stack's scaling."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    if len(data.shape) == 4 and tr_seconds:
        zooms = list(hdr.get_zooms())
        zooms[3] = tr_seconds
        hdr.set_zooms(zooms)
    hdr.set_slope_inter(*(scale or (1.0, 0.0)))
    return img


def nifti_header(lay: Layout, tr_seconds: float | None = None) -> bytes:
    """The bytes :func:`write_nifti` writes before the voxels of a volume of layout ``lay`` (header,
    extension flag, padding up to ``vox_offset``), computed as nibabel computes them, without nibabel."""
    from medpipe.dicom.nifti import nifti1_header

    return nifti1_header(lay.shape, lay.dtype, lay.affine, lay.scale, tr_seconds)


def write_nifti(volume: Volume, path: Path, tr_seconds: float | None = None) -> None:
    """Write ``volume`` as NIfTI-1 (sform and qform = scanner RAS), atomically."""
    import nibabel as nib

    img = _nifti_image(volume.data, volume.affine, volume.scale, tr_seconds)
    if path.name.endswith(".gz"):
        # nibabel compresses on one thread: write plain NIfTI, then deflate it in parallel chunks
        with atomic_path(path) as tmp:
            plain = tmp.with_name(tmp.name[:-3])  # the temporary name without .gz
            try:
                nib.save(img, plain)
                gzip_file(plain, tmp)
            finally:
                plain.unlink(missing_ok=True)
    else:
        with atomic_path(path) as tmp:
            nib.save(img, tmp)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def stream_volume(stack: Stack, path: Path, *, tr_seconds: float | None = None,
                  threads: int = 1) -> tuple[Layout, dict[int, np.ndarray]]:
    """Write the NIfTI volume of a planned, unresampled stack straight from its source files, atomically.

    Each file is read once, its frames flipped into NIfTI's layout (:func:`~medpipe.dicom.frames.frame_to_slice`)
    and written at their place in the output on ``threads`` threads, so the volume is never held in
    memory. The file holds the same bytes :func:`write_nifti` writes for :func:`build_volume` of the stack.

    Returns:
        The volume's :class:`Layout`, and its three preview planes ``{volume axis: plane}`` of the first
        time point (:func:`medpipe.dicom.preview.preview_indices`, for :func:`~medpipe.dicom.preview.write_preview_planes`).

    Raises:
        PixelReadErrors: one :class:`FrameReadError` per file whose pixels could not be read (nothing is written).
    """
    from medpipe.dicom.preview import preview_indices

    lay = layout(stack)
    nk = stack.n_slices
    cols, rows = lay.shape[:2]
    slice_bytes = cols * rows * lay.dtype.itemsize
    head = nifti_header(lay, tr_seconds)
    want = preview_indices(lay.shape[:3], lay.affine)
    planes: dict[int, np.ndarray] = {0: np.empty((rows, nk), lay.dtype), 1: np.empty((cols, nk), lay.dtype)}
    where: dict[str, list[tuple[int, int, FrameRef]]] = defaultdict(list)
    for k, row in enumerate(stack.grid):
        for t, ref in enumerate(row):
            where[ref.key].append((k, t, ref))

    def write_file(fd: int, key: str, items: list[tuple[int, int, FrameRef]]) -> FrameReadError | None:
        try:
            pixels = read_pixels(key, items[0][2].header)
        except FrameReadError as exc:
            return exc
        for k, t, ref in items:
            frame = _frame_array(pixels, ref)[::-1]  # [flipped row, column]: a NIfTI slice, C order
            if lay.scale is None:
                out = np.ascontiguousarray(frame * np.float32(ref.frame.slope) + np.float32(ref.frame.intercept),
                                           dtype=np.float32)
            else:
                out = np.ascontiguousarray(frame, dtype=lay.dtype)
            _pwrite_all(fd, out, len(head) + (t * nk + k) * slice_bytes)
            if t == 0:  # out[j, i] is volume[i, j, k]
                planes[0][:, k] = out[:, want[0]]
                planes[1][:, k] = out[want[1], :]
                if k == want[2]:
                    planes[2] = out.T.copy()
        return None

    def write(target: Path) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            os.ftruncate(fd, len(head) + slice_bytes * nk * stack.n_times)
            _pwrite_all(fd, np.frombuffer(head, np.uint8), 0)
            jobs = list(where.items())
            n = max(1, min(threads, len(jobs)))
            # one run of consecutive files per thread: each writes one region of the output in order
            parts = [jobs[len(jobs) * g // n : len(jobs) * (g + 1) // n] for g in range(n)]

            def write_part(part: list[tuple[str, list[tuple[int, int, FrameRef]]]]) -> list[FrameReadError | None]:
                return [write_file(fd, key, items) for key, items in part]

            if n > 1:
                with ThreadPoolExecutor(n) as pool:
                    results = [r for done in pool.map(write_part, parts) for r in done]
            else:
                results = write_part(parts[0])
        finally:
            os.close(fd)
        errors = [e for e in results if e is not None]
        if errors:
            raise PixelReadErrors(errors)

    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            plain = tmp.with_name(tmp.name[:-3])  # the temporary name without .gz
            try:
                write(plain)
                gzip_file(plain, tmp)
            finally:
                plain.unlink(missing_ok=True)
        else:
            write(tmp)
    return lay, planes


def sidecar(stack: Stack, volume: Volume | Layout, extra: dict[str, Any]) -> dict[str, Any]:
    """Key DICOM metadata plus the ordered source SOP Instance UIDs of a volume."""
    meta = dict(stack.first.meta)
    multi = any(ref.header.n_frames > 1 for row in stack.grid for ref in row)
    uids = [[ref.header.sop_uid for ref in row] for row in stack.grid]
    out: dict[str, Any] = {
        **meta,
        "SeriesInstanceUID": stack.series_uid,
        "SeriesPart": stack.part,
        "Status": stack.status,
        "Reasons": stack.reasons,
        "Shape": list(volume.shape),
        "VoxelSpacing": list(volume.spacing),
        "Resampled": stack.resample,
        "SourceSOPInstanceUIDs": [u[0] for u in uids] if stack.n_times == 1 else uids,
        **extra,
    }
    if multi:
        frames = [[ref.frame.index + 1 for ref in row] for row in stack.grid]
        out["SourceFrameNumbers"] = [f[0] for f in frames] if stack.n_times == 1 else frames
    if stack.resample and stack.geometry is not None:
        out["SourceSliceDistances"] = [round(float(d), 4) for d in stack.geometry.distances]
    return out


def write_sidecar(path: Path, content: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(content, indent=1, default=str) + "\n")
