"""DICOM geometry: the one place where image position / orientation / spacing become an affine.

Conventions
-----------
* A 2D DICOM frame has ``Rows`` x ``Columns`` pixels. ``ImageOrientationPatient`` (IOP) holds the
  row direction cosine (direction of increasing *column* index) and the column direction cosine
  (direction of increasing *row* index). ``PixelSpacing`` is ``[row spacing, column spacing]``, i.e.
  ``[spacing along the column cosine, spacing along the row cosine]``.
* medpipe volumes are indexed ``[i, j, k]`` = ``[column, flipped row, slice]``, exactly as dcm2niix
  writes them: ``volume[:, :, k] == pixel_array[::-1, :].T`` of slice ``k``. Row 0 of a DICOM frame
  (the top of the screen) is therefore ``j = rows - 1``. Following dcm2niix makes medpipe's arrays
  interchangeable with the NIfTI files most tools and label maps in the field were made from.
* DICOM patient space is LPS; NIfTI world space is RAS. :func:`voxel_to_world` returns the RAS
  affine; every reader and writer of medpipe goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Two orientations whose cosines differ by less than this are treated as the same.
ORIENTATION_TOL = 1e-4


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal of a slice plane: row cosine x column cosine (points towards increasing k)."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def voxel_to_world(
    iop: Sequence[float],
    ipp_first: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step: Sequence[float] | np.ndarray | float,
    rows: int,
) -> np.ndarray:
    """The 4x4 voxel-to-world (RAS) affine of a volume indexed ``[column, flipped row, slice]``.

    Args:
        iop: ImageOrientationPatient (6 floats, LPS).
        ipp_first: ImagePositionPatient (LPS) of slice ``k = 0`` (centre of its first stored pixel).
        pixel_spacing: DICOM PixelSpacing ``[row spacing, column spacing]`` in mm.
        slice_step: either the (signed) spacing in mm along the slice normal, or the full LPS
            vector from slice ``k`` to slice ``k+1`` (needed for sheared / tilted stacks).
        rows: the number of rows of a frame (the flipped row axis starts at the last row).
    """
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    dr, dc = float(pixel_spacing[0]), float(pixel_spacing[1])
    if np.ndim(slice_step) == 0:
        step = slice_normal(iop) * float(slice_step)  # type: ignore[arg-type]
    else:
        step = np.asarray(slice_step, dtype=float)
    lps = np.eye(4)
    lps[:3, 0] = row * dc  # column index i moves along the row cosine
    lps[:3, 1] = -col * dr  # j counts rows upwards from the last row
    lps[:3, 2] = step
    lps[:3, 3] = np.asarray(ipp_first, dtype=float) + col * dr * (rows - 1)
    return LPS_TO_RAS @ lps


def same_orientation(a: Sequence[float], b: Sequence[float], tol: float = ORIENTATION_TOL) -> bool:
    return bool(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))) <= tol)


def orientation_label(iop: Sequence[float]) -> str:
    """'axial' / 'coronal' / 'sagittal' (+ ' oblique') from the dominant axis of the slice normal."""
    n = slice_normal(iop)
    axis = int(np.argmax(np.abs(n)))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if abs(n[axis]) > 0.999 else f"{name} oblique"


@dataclass(frozen=True)
class StackGeometry:
    """What the slice positions of one stack say about its geometry.

    ``positions`` are the slice centres (LPS, first pixel) sorted along the normal.
    """

    normal: np.ndarray
    distances: np.ndarray  # signed distance of each sorted slice along the normal (mm)
    gaps: np.ndarray  # consecutive differences of ``distances``
    spacing: float  # the nominal slice spacing (median gap), mm
    uniform: bool
    missing_slices: int  # slices implied by gaps that are whole multiples of ``spacing``
    tilt_deg: float  # angle between the stack direction and the slice normal
    inplane_offsets: np.ndarray  # (n, 2) offsets of each slice in-plane (row, col cosines), mm


#: relative tolerance on slice gaps (fraction of the nominal spacing) and an absolute floor (mm)
GAP_REL_TOL = 0.01
GAP_ABS_TOL = 1e-3
#: a stack direction this far (degrees) from the normal is gantry tilt / shear
TILT_TOL_DEG = 0.05


def analyse_stack(iop: Sequence[float], positions: np.ndarray, normal: np.ndarray | None = None) -> StackGeometry:
    """Measure spacing, gaps and tilt of slice ``positions`` (n x 3, LPS, sorted along ``normal``).

    ``normal`` defaults to :func:`slice_normal` of ``iop``; pass its negative for stacks stored in
    the opposite direction.
    """
    positions = np.asarray(positions, dtype=float)
    normal = slice_normal(iop) if normal is None else np.asarray(normal, dtype=float)
    row = np.asarray(iop[:3], float)
    col = np.asarray(iop[3:6], float)
    rel = positions - positions[0]
    distances = rel @ normal
    inplane = np.stack([rel @ row, rel @ col], axis=1)
    gaps = np.diff(distances)
    if len(gaps) == 0:
        return StackGeometry(normal, distances, gaps, 0.0, True, 0, 0.0, inplane)
    spacing = float(np.min(gaps))
    median = float(np.median(gaps))
    # nominal spacing: the median gap, unless gaps of half that size exist (missing slices
    # in the majority of places are not plausible; irregular stacks are caught below)
    spacing = median if spacing > 0.5 * median else spacing
    tol = max(GAP_ABS_TOL, GAP_REL_TOL * spacing)
    uniform = bool(np.all(np.abs(gaps - spacing) <= tol))
    missing = 0
    if not uniform and spacing > 0:
        ratios = gaps / spacing
        whole = np.abs(ratios - np.round(ratios)) * spacing <= tol
        if np.all(whole):
            missing = int(np.sum(np.round(ratios) - 1))
    extent = positions[-1] - positions[0]
    along = float(extent @ normal)
    lateral = float(np.linalg.norm(extent - along * normal))
    tilt = float(np.degrees(np.arctan2(lateral, abs(along))))
    return StackGeometry(normal, distances, gaps, spacing, uniform, missing, tilt, inplane)
