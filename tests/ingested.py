"""Synthetic series ingested like a scoring run sees them, and world-space helpers, for the DICOM tests.

The series come from :mod:`tests.dicom_factory` (geometry from first principles) and go through
``medpipe.ingest``; positions of pixels of derived objects are worked out here from their own
headers, without medpipe's geometry code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medpipe.dicom.frames import instance_uid
from medpipe.ingest import ingest
from tests.dicom_factory import Geometry, pattern, write_series

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


@dataclass
class Ingested:
    """A synthetic series written by the factory and ingested."""

    truth_affine: np.ndarray  # the factory's voxel -> RAS of the stored grid (first principles)
    sources: list[Dataset]  # headers (no pixels), in the sidecar's slice order
    volume: np.ndarray  # ingest's volume
    affine: np.ndarray  # ingest's voxel -> RAS
    sidecar: dict[str, Any]
    volume_path: Path
    files: list[Path]


def ingest_series(tmp: Path, geo: Geometry, shape: tuple[int, int, int], **kw: Any) -> Ingested:
    """Write ``pattern(shape)`` with ``geo`` (files and instance numbers shuffled) and ingest it."""
    kw.setdefault("extra", {"BodyPartExamined": "ABDOMEN"})
    w = write_series(tmp / "src", pattern(shape), geo, naming="random", instance_numbers="shuffled", **kw)
    report = ingest(tmp / "src", tmp / "out", workers=1)
    (row,) = report.volumes
    side = json.loads((tmp / "out" / row["sidecar"]).read_text())
    img = nib.load(tmp / "out" / row["volume"])
    headers = {instance_uid(d): d for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in w.files)}
    return Ingested(w.affine, [headers[u] for u in side["SourceSOPInstanceUIDs"]],
                    np.asarray(img.get_fdata(dtype=np.float32)), img.affine, side, tmp / "out" / row["volume"], w.files)


def axial_series(tmp: Path) -> Ingested:
    """16 columns x 12 rows x 8 slices, axial, 1.1 x 0.8 x 2.5 mm."""
    return ingest_series(tmp, Geometry(origin=(-10.0, -20.0, 30.0)), (16, 12, 8))


def two_blocks(shape: tuple[int, ...]) -> np.ndarray:
    """A label map with two touching, non-overlapping blocks (labels 1 and 2)."""
    lab = np.zeros(shape[:3], np.uint8)
    lab[3:9, 2:7, 2:5] = 1
    lab[10:14, 5:10, 4:7] = 2
    lab[8:11, 6:8, 4] = 2
    return lab


def pixel_lps(ds: Dataset) -> list[np.ndarray]:
    """LPS position of every pixel centre of every frame of a multi-frame object, from its own header."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for fg in ds.PerFrameFunctionalGroupsSequence:
        ipp = np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        ori = (fg.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0].ImageOrientationPatient
        ps = (fg.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0].PixelSpacing
        row, col = np.asarray(ori[:3], float), np.asarray(ori[3:], float)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        out.append(ipp + (c * float(ps[1]))[..., None] * row + (r * float(ps[0]))[..., None] * col)
    return out


def values_at(volume: np.ndarray, affine: np.ndarray, lps: np.ndarray) -> np.ndarray:
    """Nearest-voxel values of ``volume`` (voxel -> RAS ``affine``) at LPS points (outside: -1)."""
    ras = lps @ LPS.T
    idx = np.rint((ras - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)
    inside = np.all((idx >= 0) & (idx < volume.shape[:3]), axis=-1)
    out = np.full(lps.shape[:-1], -1.0)
    out[inside] = volume[tuple(idx[inside].T)]
    return out
