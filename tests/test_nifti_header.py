"""``medpipe.dicom.nifti`` computes the NIfTI-1 header and grid orientation nibabel computes, without nibabel.

The reference is nibabel itself: the header bytes ``write_nifti`` (nibabel's ``save``) writes before the
voxels, and ``nibabel.orientations.io_orientation``, for random grids (axis permutations and flips,
oblique rotations, anisotropic spacing, shear), every type ingest writes, 2D / 3D / 4D shapes, with and
without scaling and repetition time.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medpipe.dicom.nifti import DATATYPES, io_orientation, nifti1_header
from medpipe.dicom.volume import Volume, write_nifti


def _affines(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([1, -1], repeat=3):
            a = np.eye(4)
            a[:3, :3] = 0
            for ax in range(3):
                a[perm[ax], ax] = flips[ax] * [0.7, 1.3, 2.5][ax]
            a[:3, 3] = rng.normal(size=3) * 100
            out.append(a)
    for _ in range(40):  # oblique, anisotropic, some sheared (gantry tilt)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        a = np.eye(4)
        a[:3, :3] = q @ np.diag(rng.uniform(0.2, 5.0, size=3))
        if rng.random() < 0.3:
            a[:3, 2] += rng.normal(size=3) * 0.3
        a[:3, 3] = rng.normal(size=3) * 200
        out.append(a)
    return out


# nibabel refuses to write 64-bit integers without being told (ingest writes them only for a series that
# mixes signed and unsigned 32-bit files)
@pytest.mark.parametrize("dtype", sorted((d for d in DATATYPES if d.itemsize < 8 or d.kind == "f"), key=str), ids=str)
def test_header_bytes_are_nibabels(tmp_path: Path, dtype: np.dtype) -> None:
    rng = np.random.default_rng(1)
    for n, affine in enumerate(_affines()):
        shape = [(7, 5, 3), (6, 4, 3, 2), (9, 8, 1)][n % 3]
        scale = [None, (1.0, -1024.0), (0.37, 12.5)][n % 3] if dtype.kind in "iu" else None
        tr = [None, 2.0, 0.8][n % 3]
        data = (rng.integers(0, 100, size=shape)).astype(dtype)
        path = tmp_path / "v.nii"
        write_nifti(Volume(np.asfortranarray(data), affine, scale, (1.0, 1.0, 1.0)), path, tr_seconds=tr)
        ref = path.read_bytes()[:352]
        mine = nifti1_header(shape, dtype, affine, scale, tr)
        assert mine == ref, (n, dtype, shape, scale, tr)


def test_io_orientation_is_nibabels() -> None:
    for affine in _affines(2):
        assert np.array_equal(io_orientation(affine), nib.orientations.io_orientation(affine), equal_nan=True)
    degenerate = np.diag([1.0, 0.0, 2.0, 1.0])
    assert np.array_equal(io_orientation(degenerate), nib.orientations.io_orientation(degenerate), equal_nan=True)
