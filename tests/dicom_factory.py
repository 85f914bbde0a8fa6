"""Synthetic single-frame DICOM series with a known ground truth, for adversarial ingest tests.

:func:`write_series` writes one series from an integer array ``stored[i, j, k]`` (or
``[i, j, k, t]``) indexed ``[column, row, slice(, time)]`` and a :class:`Geometry`. It returns a
:class:`Written` record with the ground truth in modality units (stored * slope + intercept, per
slice), the truth grid's voxel -> RAS affine, and the file / SOP Instance UID of every frame.

Geometry is computed here from first principles (not with medpipe's code): the LPS position of
pixel ``(i, j)`` of slice ``k`` is ``IPP_k + i * PixelSpacing[1] * row + j * PixelSpacing[0] * col``
and ``IPP_k = origin + k * (slice_sign * slice_spacing * normal + shift)``, ``normal = row x col``.
RAS = diag(-1, -1, 1) LPS.

:func:`assert_world_equal` maps a NIfTI volume onto the truth grid through both affines and
compares voxels, so axis order and flips of the output do not matter, a wrong orientation does.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

__all__ = [
    "AXIAL", "CORONAL", "SAGITTAL", "Geometry", "Written", "assert_world_equal", "ct_gantry_tilt",
    "load_nifti", "oblique_iop", "pattern", "sha256_tree", "strip_pixel_data", "truncate_copy", "uid",
    "write_series", "ENCAPSULATED", "ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "RLELossless",
    "JPEGLSLossless", "JPEG2000Lossless", "DeflatedExplicitVRLittleEndian",
]

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

#: transfer syntaxes written with ``Dataset.compress`` (encapsulated pixel data)
ENCAPSULATED = {RLELossless, JPEGLSLossless, JPEG2000Lossless}

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def uid(*parts: object) -> str:
    """A deterministic UID (pydicom root) derived from ``parts``."""
    return str(generate_uid(entropy_srcs=[repr(p) for p in parts]))


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def oblique_iop(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0, base: Sequence[float] = AXIAL) -> tuple[float, ...]:
    """``base`` orientation rotated about the LPS x, then y, then z axes (degrees)."""
    r = _rot(2, rz) @ _rot(1, ry) @ _rot(0, rx)
    row = r @ np.asarray(base[:3], float)
    col = r @ np.asarray(base[3:], float)
    return tuple(float(v) for v in (*row, *col))


def _ds_str(v: float) -> str:
    """A DS string (<= 16 characters) for ``v``; truth values are parsed back from it."""
    for decimals in (6, 5, 4, 3, 2, 1, 0):
        s = f"{v:.{decimals}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot format {v} as DS")


def _ds(values: Iterable[float]) -> list[str]:
    return [_ds_str(float(v)) for v in values]


@dataclass
class Geometry:
    """Where the slices of a synthetic series lie (LPS, mm)."""

    iop: Sequence[float] = AXIAL
    origin: Sequence[float] = (-10.0, -20.0, 30.0)  # centre of pixel (0, 0) of slice 0
    pixel_spacing: Sequence[float] = (0.8, 1.1)  # DICOM order: [row spacing, column spacing]
    slice_spacing: float = 2.5
    slice_sign: int = 1  # slice k advances along +normal (row x col) or -normal
    shift: Sequence[float] = (0.0, 0.0)  # extra IPP shift per slice along (row, column) cosines: shear

    def __post_init__(self) -> None:
        # the truth uses exactly the values written to the files
        self.iop = tuple(float(s) for s in _ds(self.iop))
        self.pixel_spacing = tuple(float(s) for s in _ds(self.pixel_spacing))

    @property
    def row(self) -> np.ndarray:
        return np.asarray(self.iop[:3], float)

    @property
    def col(self) -> np.ndarray:
        return np.asarray(self.iop[3:], float)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row, self.col)
        return n / np.linalg.norm(n)

    @property
    def step(self) -> np.ndarray:
        """LPS vector from slice k to slice k + 1."""
        return (
            self.slice_sign * self.slice_spacing * self.normal
            + self.shift[0] * self.row + self.shift[1] * self.col
        )

    def ipp(self, k: int) -> np.ndarray:
        return np.asarray(self.origin, float) + k * self.step

    def lps_affine(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, 0] = self.row * self.pixel_spacing[1]
        a[:3, 1] = self.col * self.pixel_spacing[0]
        a[:3, 2] = self.step
        a[:3, 3] = np.asarray(self.origin, float)
        return a

    def affine(self) -> np.ndarray:
        """Voxel [i, j, k] -> RAS affine of the truth grid (sheared when ``shift`` is set)."""
        return LPS_TO_RAS @ self.lps_affine()

    def world(self, shape: Sequence[int]) -> np.ndarray:
        """LPS coordinates of every voxel centre, shape ``(*shape[:3], 3)``."""
        idx = np.indices(tuple(shape[:3]), dtype=float)
        a = self.lps_affine()
        return np.einsum("ab,b...->...a", a[:3, :3], idx) + a[:3, 3]


def ct_gantry_tilt(tilt_deg: float, table_step: float, **kw: Any) -> Geometry:
    """CT acquired with a tilted gantry: slices tilted about the x axis, the table moves along z.

    IOP column cosine = (0, cos t, sin t); IPP_k = origin + k * table_step * (0, 0, 1). In the
    terms of :class:`Geometry` that is a slice spacing of ``table_step * cos t`` plus an in-plane
    shift of ``table_step * sin t`` along the column cosine per slice.
    """
    t = np.radians(tilt_deg)
    iop = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))
    geo = Geometry(iop=iop, slice_spacing=table_step, **kw)
    # exact: choose spacing and shift from the (rounded) IOP so that the step is along z
    z = np.array([0.0, 0.0, table_step])
    geo.slice_spacing = float(z @ geo.normal)
    geo.shift = (0.0, float(z @ geo.col))
    return geo


def pattern(shape: Sequence[int], seed: int = 0, noise: int = 40, dtype: Any = np.uint16, base: int = 1) -> np.ndarray:
    """An asymmetric deterministic integer volume: a ramp with distinct steps per axis plus noise.

    Every flip or transpose changes it; ``noise=0`` gives a purely linear ramp (interpolation exact).
    """
    idx = np.indices(tuple(shape), dtype=np.int64)
    steps = [3, 41, 467, 1999][: len(shape)]
    ramp = base + sum(s * i for s, i in zip(steps, idx))
    if noise:
        ramp = ramp + np.random.default_rng(seed).integers(0, noise, size=tuple(shape))
    info = np.iinfo(dtype)
    if ramp.max() > info.max or ramp.min() < info.min:
        raise ValueError(f"pattern of shape {shape} does not fit {np.dtype(dtype)}")
    return ramp.astype(dtype)


@dataclass
class Written:
    """What :func:`write_series` wrote, and the truth to compare against."""

    folder: Path
    geometry: Geometry
    series_uid: str
    study_uid: str
    stored: np.ndarray  # [i, j, k(, t)] stored integers, including dropped slices
    truth: np.ndarray  # float64 modality values, same shape
    paths: dict[tuple[int, int], Path] = field(default_factory=dict)  # (k, t) -> file written
    sop_uids: dict[tuple[int, int], str] = field(default_factory=dict)  # (k, t) -> SOP Instance UID
    dropped: tuple[int, ...] = ()

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine()

    @property
    def files(self) -> list[Path]:
        return sorted(self.paths.values())

    def uid_of(self, path: Path | str) -> str:
        for kt, p in self.paths.items():
            if Path(p) == Path(path):
                return self.sop_uids[kt]
        raise KeyError(path)


def write_series(
    folder: Path | str,
    stored: np.ndarray,
    geometry: Geometry | None = None,
    *,
    modality: str = "CT",
    transfer_syntax: str = ExplicitVRLittleEndian,
    slopes: float | Sequence[float] = 1.0,
    intercepts: float | Sequence[float] = 0.0,
    naming: str | Callable[[int, int], str] = "ordered",
    instance_numbers: str | Callable[[int, int], int | None] = "ordered",
    drop: Iterable[int] = (),
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "PAT001",
    series_number: int = 1,
    series_description: str = "synthetic",
    image_type: Sequence[str] | None = None,
    gantry_tilt: float | None = None,
    bits_stored: int | None = None,
    extra: Mapping[str, Any] | Callable[[int, int], Mapping[str, Any]] | None = None,
    seed: int = 0,
    tag: str = "s",
) -> Written:
    """Write one single-frame-per-file series; see the module docstring.

    Args:
        stored: integer array [i=column, j=row, k=slice(, t=time)]; uint16 or int16.
        slopes, intercepts: RescaleSlope / RescaleIntercept, one value or one per slice k.
        naming: ``ordered`` / ``reversed`` / ``random`` / ``uid``, or ``(k, t) -> relative path``.
        instance_numbers: ``ordered`` / ``reversed`` / ``shuffled`` / ``constant`` / ``none``, or
            ``(k, t) -> int | None``.
        drop: slice indices k not written (the truth keeps them).
        bits_stored: BitsStored < 16; signed values are written without sign extension of the
            unused high bits (legal DICOM, a classic reader trap).
        extra: attributes set on every dataset, or ``(k, t) -> attributes``.
        tag: distinguishes the UIDs of several series written with the same seed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    geo = geometry or Geometry()
    stored = np.asarray(stored)
    if stored.ndim == 3:
        stored4 = stored[..., None]
    elif stored.ndim == 4:
        stored4 = stored
    else:
        raise ValueError("stored must be 3D or 4D")
    if stored.dtype not in (np.uint16, np.int16):
        raise ValueError("stored must be uint16 or int16")
    ncol, nrow, nk, nt = stored4.shape
    signed = stored.dtype == np.int16
    slope_k = [float(_ds_str(s)) for s in (slopes if isinstance(slopes, Sequence) else [slopes] * nk)]
    inter_k = [float(_ds_str(s)) for s in (intercepts if isinstance(intercepts, Sequence) else [intercepts] * nk)]
    if len(slope_k) != nk or len(inter_k) != nk:
        raise ValueError("one slope / intercept per slice")
    truth4 = stored4.astype(np.float64) * np.asarray(slope_k)[None, None, :, None] + np.asarray(inter_k)[
        None, None, :, None
    ]
    drop = tuple(sorted(set(drop)))
    study_uid = study_uid or uid("study", patient_id, seed)
    series_uid = series_uid or uid("series", tag, seed)
    frame_uid = uid("for", study_uid)
    written = Written(
        folder, geo, series_uid, study_uid, stored, truth4 if stored.ndim == 4 else truth4[..., 0], dropped=drop
    )
    rng = random.Random(f"{seed}-{tag}")
    frames = [(k, t) for t in range(nt) for k in range(nk) if k not in drop]
    n = len(frames)
    if callable(instance_numbers):
        inst = {kt: instance_numbers(*kt) for kt in frames}
    else:
        order = list(range(1, n + 1))
        if instance_numbers == "reversed":
            order.reverse()
        elif instance_numbers == "shuffled":
            rng.shuffle(order)
        elif instance_numbers == "constant":
            order = [1] * n
        elif instance_numbers == "none":
            order = [None] * n  # type: ignore[list-item]
        elif instance_numbers != "ordered":
            raise ValueError(instance_numbers)
        inst = dict(zip(frames, order))
    names: dict[tuple[int, int], str] = {}
    for idx, kt in enumerate(frames):
        if callable(naming):
            names[kt] = naming(*kt)
        elif naming == "ordered":
            names[kt] = f"{tag}_IM{idx:05d}.dcm"
        elif naming == "reversed":
            names[kt] = f"{tag}_IM{n - 1 - idx:05d}.dcm"
        elif naming == "random":
            names[kt] = "".join(rng.choice("0123456789ABCDEF") for _ in range(12))
        elif naming == "uid":
            names[kt] = ""  # filled in below
        else:
            raise ValueError(naming)

    normal = geo.normal
    bits = bits_stored or 16
    for kt in frames:
        k, t = kt
        sop_uid = uid("sop", series_uid, tag, seed, k, t)
        ds = _base_dataset(modality, sop_uid)
        ds.ImageType = list(image_type or ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "M"])
        ds.PatientName = "Synthetic^Test"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = f"ACC{seed}"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "synthetic study"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.SeriesDate = "20240102"
        ds.SeriesTime = "101600"
        ds.Modality = modality
        ds.Manufacturer = "medpipe-test-factory"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = t + 1
        ds.AcquisitionTime = f"1017{t:02d}.000000"
        ds.ContentTime = ds.AcquisitionTime
        if inst[kt] is not None:
            ds.InstanceNumber = inst[kt]
        ipp = geo.ipp(k)
        ds.ImagePositionPatient = _ds(ipp)
        ds.ImageOrientationPatient = _ds(geo.iop)
        ds.SliceLocation = _ds_str(float(ipp @ normal))
        ds.PixelSpacing = _ds(geo.pixel_spacing)
        ds.SliceThickness = _ds_str(geo.slice_spacing)
        if modality == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = "STANDARD"
            ds.RescaleType = "HU"
            if gantry_tilt is not None:
                ds.GantryDetectorTilt = _ds_str(gantry_tilt)
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = "500"
            ds.EchoTime = "10"
            ds.EchoNumbers = 1
            ds.MagneticFieldStrength = "3"
            ds.SpacingBetweenSlices = _ds_str(geo.slice_spacing)
            if nt > 1:
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = nt
        ds.RescaleIntercept = _ds_str(inter_k[k])
        ds.RescaleSlope = _ds_str(slope_k[k])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nrow
        ds.Columns = ncol
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = int(signed)
        arr = np.ascontiguousarray(stored4[:, :, k, t].T)  # (rows, columns)
        if bits < 16:
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            if arr.min() < lo or arr.max() > hi:
                raise ValueError(f"values do not fit BitsStored {bits}")
        if extra is not None:
            for key, value in (extra(k, t) if callable(extra) else extra).items():
                setattr(ds, key, value)
        name = names[kt] or f"{sop_uid}.dcm"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(ds, arr, path, UID(transfer_syntax), bits)
        written.paths[kt] = path
        written.sop_uids[kt] = sop_uid
    return written


def _base_dataset(modality: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _save(ds: Dataset, arr: np.ndarray, path: Path, ts: UID, bits: int) -> None:
    if ts in ENCAPSULATED:
        ds.PixelData = arr.tobytes()  # so compress() sees a consistent dataset
        ds.compress(ts, arr, generate_instance_uid=False)  # keep the SOP Instance UID we chose
    else:
        raw = arr
        if bits < 16 and arr.dtype == np.int16:
            raw = (arr.view(np.uint16) & np.uint16((1 << bits) - 1))  # no sign extension in high bits
        ds.PixelData = raw.astype("<u2" if raw.dtype.kind == "u" else "<i2").tobytes()
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)


# -- junk and checks -----------------------------------------------------------------------


def truncate_copy(src: Path, dst: Path, keep_bytes_of_pixel_data: int = 100) -> Path:
    """Copy ``src`` cut inside its pixel data (``keep_bytes_of_pixel_data`` bytes of it kept)."""
    data = Path(src).read_bytes()
    pos = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag, explicit or implicit VR
    if pos < 0:
        raise ValueError("no pixel data tag")
    header_len = 12 if data[pos + 4 : pos + 6] in (b"OW", b"OB") else 8
    Path(dst).write_bytes(data[: pos + header_len + keep_bytes_of_pixel_data])
    return Path(dst)


def strip_pixel_data(src: Path, dst: Path, sop_uid: str) -> Path:
    """A copy of ``src`` without Pixel Data (the image pixel module kept), with a new SOP UID."""
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(dst, enforce_file_format=True)
    return Path(dst)


def sha256_tree(folder: Path | str) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    folder = Path(folder)
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def load_nifti(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Values in modality units (NIfTI scl_slope / scl_inter applied) and the sform affine."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float64)), img.affine


def assert_world_equal(
    path: Path | str,
    truth: np.ndarray,
    truth_affine: np.ndarray,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    index_tol: float = 1e-3,
) -> np.ndarray:
    """Assert that the NIfTI at ``path`` holds ``truth`` at the same world (RAS) positions.

    The truth grid must map onto the output grid by a signed permutation of axes plus an integer
    offset (any axis order and flips are fine; any rotation, shear, scaling or sub-voxel shift is a
    failure), the output must cover exactly the truth grid, and every voxel must match.
    Returns the output data re-ordered onto the truth grid.
    """
    data, affine = load_nifti(path)
    truth = np.asarray(truth, dtype=np.float64)
    m = np.linalg.inv(affine) @ np.asarray(truth_affine, float)  # truth voxel -> output voxel
    r, t = m[:3, :3], m[:3, 3]
    r_int, t_int = np.round(r), np.round(t)
    assert np.allclose(r, r_int, atol=index_tol) and np.allclose(t, t_int, atol=index_tol), (
        f"output grid is not the truth grid up to axis order / flips:\ntruth->output voxel map\n{np.round(m, 4)}"
        f"\noutput affine\n{np.round(affine, 4)}\ntruth affine\n{np.round(truth_affine, 4)}"
    )
    assert sorted(np.abs(r_int).sum(axis=0)) == [1, 1, 1] and sorted(np.abs(r_int).sum(axis=1)) == [1, 1, 1], (
        f"not a signed permutation:\n{r_int}"
    )
    perm = [int(np.argmax(np.abs(r_int[:, a]))) for a in range(3)]  # truth axis a -> output axis perm[a]
    expect_shape = [0, 0, 0]
    for a in range(3):
        expect_shape[perm[a]] = truth.shape[a]
    assert list(data.shape[:3]) == expect_shape, f"output shape {data.shape} does not cover truth {truth.shape}"
    assert data.shape[3:] == truth.shape[3:], f"output shape {data.shape} vs truth {truth.shape}"
    idx = np.indices(truth.shape[:3]).reshape(3, -1)
    out_idx = (r_int @ idx + t_int[:, None]).astype(int)
    for a in range(3):
        assert out_idx[a].min() >= 0 and out_idx[a].max() < data.shape[a], "truth grid falls outside the output"
    mapped = data[out_idx[0], out_idx[1], out_idx[2]].reshape(truth.shape)
    np.testing.assert_allclose(mapped, truth, atol=atol, rtol=rtol, err_msg="voxel values differ in world space")
    return mapped
