"""The geometry functions one by one, against affines and stack measures worked out by hand.

The ingest tests check geometry end to end (against the factory's first-principles affine); these
pin each function of :mod:`medpipe.dicom.geometry` on its own, on cases chosen so that a slip (a
swapped cosine, a sign, a ``<`` for ``<=`` at a tolerance, a wrong slice of IOP) changes the answer.
They are the tests mutation testing (``benchmarks/mutation.py``) found missing.
"""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
from pydicom.valuerep import DSdecimal

from medpipe.dicom.geometry import (
    GAP_ABS_TOL,
    ORIENTATION_TOL,
    analyse_stack,
    orientation_label,
    same_orientation,
    slice_normal,
    voxel_to_world,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _decimal(values: tuple[float, ...]) -> list[DSdecimal]:
    """Values as pydicom returns DS elements under ``pydicom.config.use_DS_decimal()``."""
    return [DSdecimal(Decimal(f"{v:.12g}")) for v in values]


# -- slice_normal ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("iop", "normal"), [
    (AXIAL, (0.0, 0.0, 1.0)),  # x cross y = +z (towards head in LPS)
    (CORONAL, (0.0, 1.0, 0.0)),  # x cross -z = +y (posterior)
    (SAGITTAL, (-1.0, 0.0, 0.0)),  # y cross -z = -x (right)
])
def test_slice_normal_is_row_cross_column(iop: tuple[float, ...], normal: tuple[float, ...]) -> None:
    assert np.allclose(slice_normal(iop), normal, atol=0)


def test_slice_normal_is_unit_length_for_cosines_that_are_not() -> None:
    # stored cosines are rounded (often to 6 digits): the normal must still be divided by its length
    # (guards `n * norm` for `n / norm`)
    n = slice_normal((2.0, 0.0, 0.0, 0.0, 0.0, -3.0))
    assert np.allclose(n, (0.0, 1.0, 0.0))
    c = math.cos(math.radians(10))
    s = math.sin(math.radians(10))
    n = slice_normal(_decimal((1.0, 0.0, 0.0, 0.0, c, s)))
    assert n.dtype == np.float64 and np.allclose(n, (0.0, -s, c))


# -- voxel_to_world ----------------------------------------------------------------------------------------


def test_voxel_to_world_by_hand_for_a_sagittal_grid() -> None:
    """Sagittal slices, row spacing 2 != column spacing 3, 5 rows, slice step 4 mm; worked out in LPS:

    i (along the row cosine (0,1,0), column spacing 3) -> (0, 3, 0)
    j (rows upwards: minus the column cosine (0,0,-1), row spacing 2) -> (0, 0, 2)
    k (normal (-1,0,0) times 4) -> (-4, 0, 0)
    origin: the last row's first pixel = IPP + 4 rows * 2 mm * (0,0,-1) = (10, 20, 22)
    and RAS negates x and y of every column.
    """
    a = voxel_to_world(SAGITTAL, (10.0, 20.0, 30.0), (2.0, 3.0), 4.0, rows=5)
    expected = np.array([
        [0.0, 0.0, 4.0, -10.0],
        [-3.0, 0.0, 0.0, -20.0],
        [0.0, 2.0, 0.0, 22.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    assert np.array_equal(a, expected)
    # the first stored pixel (row 0, column 0 of slice 0) is voxel (0, rows-1, 0) and lies at IPP
    assert np.allclose(a @ (0, 4, 0, 1), (-10.0, -20.0, 30.0, 1.0))


def test_voxel_to_world_takes_a_step_vector_for_sheared_stacks() -> None:
    a = voxel_to_world(AXIAL, (0.0, 0.0, 0.0), (1.0, 1.0), (0.5, -0.25, 2.0), rows=3)
    assert np.array_equal(a[:3, 2], (-0.5, 0.25, 2.0))  # the LPS step, in RAS
    b = voxel_to_world(AXIAL, (0.0, 0.0, 0.0), (1.0, 1.0), -2.0, rows=3)
    assert np.array_equal(b[:3, 2], (0.0, 0.0, -2.0))  # a signed scalar step runs against the normal


def test_voxel_to_world_accepts_decimal_string_values() -> None:
    # pydicom returns DS as Decimal under use_DS_decimal(); float arithmetic on Decimal raises, so every
    # input must be converted (guards each `np.asarray(..., dtype=float)` losing its dtype)
    iop = (1.0, 0.0, 0.0, 0.0, 0.6, 0.8)
    plain = voxel_to_world(iop, (1.5, -2.0, 3.0), (0.5, 0.75), 1.25, rows=7)
    dec = voxel_to_world(_decimal(iop), _decimal((1.5, -2.0, 3.0)), _decimal((0.5, 0.75)), DSdecimal("1.25"), rows=7)
    assert dec.dtype == np.float64 and np.allclose(dec, plain)
    step = voxel_to_world(_decimal(iop), _decimal((1.5, -2.0, 3.0)), _decimal((0.5, 0.75)),
                          _decimal((0.0, 0.75, 1.0)), rows=7)
    assert step.dtype == np.float64 and np.allclose(step[:3, 2], (0.0, -0.75, 1.0))


# -- same_orientation / orientation_label -------------------------------------------------------------------


def test_same_orientation_at_and_beyond_its_tolerance() -> None:
    assert same_orientation(AXIAL, AXIAL)
    assert not same_orientation(AXIAL, CORONAL)
    at_tol = (1.0, 0.0, 0.0, 0.0, 1.0, ORIENTATION_TOL)  # differs by exactly the tolerance: same
    assert same_orientation(AXIAL, at_tol)
    assert not same_orientation(AXIAL, (1.0, 0.0, 0.0, 0.0, 1.0, 2 * ORIENTATION_TOL))
    assert not same_orientation(AXIAL, (1.0, 0.0, 0.0, 0.0, 1.0, -2 * ORIENTATION_TOL))  # either sign
    assert not same_orientation(AXIAL, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0))  # flipped, not the same
    assert same_orientation(AXIAL, (1.0, 0.0, 0.0, 0.0, 1.0, 0.05), tol=0.1)
    assert same_orientation(_decimal(AXIAL), _decimal(at_tol))


@pytest.mark.parametrize(("iop", "label"), [
    (AXIAL, "axial"),
    (CORONAL, "coronal"),
    (SAGITTAL, "sagittal"),
    # 0.999 exactly along z (cos = 0.999): the threshold itself is already oblique
    ((1.0, 0.0, 0.0, 0.0, 0.999, math.sqrt(1 - 0.999**2)), "axial oblique"),
    ((1.0, 0.0, 0.0, 0.0, math.cos(math.radians(20)), math.sin(math.radians(20))), "axial oblique"),
    ((math.sin(math.radians(30)), math.cos(math.radians(30)), 0.0, 0.0, 0.0, -1.0), "sagittal oblique"),
    ((1.0, 0.0, 0.0, 0.0, math.sin(math.radians(15)), -math.cos(math.radians(15))), "coronal oblique"),
])
def test_orientation_label(iop: tuple[float, ...], label: str) -> None:
    assert orientation_label(iop) == label


# -- analyse_stack -----------------------------------------------------------------------------------------


def _axial_stack(z: list[float], x: float = 0.0) -> np.ndarray:
    return np.array([[x, 0.0, zi] for zi in z])


def test_uniform_stack() -> None:
    g = analyse_stack(AXIAL, _axial_stack([-5.0, -2.5, 0.0, 2.5]))
    assert g.spacing == 2.5 and g.uniform and g.missing_slices == 0 and g.tilt_deg == 0.0
    assert np.array_equal(g.normal, (0.0, 0.0, 1.0))
    assert np.array_equal(g.distances, (0.0, 2.5, 5.0, 7.5)) and np.array_equal(g.gaps, (2.5, 2.5, 2.5))
    assert np.array_equal(g.inplane_offsets, np.zeros((4, 2)))


def test_single_slice_has_no_spacing() -> None:
    g = analyse_stack(CORONAL, np.array([[3.0, 4.0, 5.0]]))
    assert g.spacing == 0.0 and g.uniform is True and g.missing_slices == 0 and g.tilt_deg == 0.0
    assert np.array_equal(g.normal, (0.0, 1.0, 0.0))
    assert np.array_equal(g.distances, [0.0]) and g.gaps.shape == (0,)
    assert np.array_equal(g.inplane_offsets, [[0.0, 0.0]])


def test_two_slices() -> None:
    g = analyse_stack(AXIAL, _axial_stack([0.0, 3.0]))
    assert g.spacing == 3.0 and g.uniform and g.missing_slices == 0 and g.tilt_deg == 0.0
    assert np.array_equal(g.distances, (0.0, 3.0)) and np.array_equal(g.gaps, [3.0])
    tilted = analyse_stack(AXIAL, np.array([[0.0, 0.0, 0.0], [0.0, 3.0, 3.0]]))  # two slices can be tilted
    assert tilted.tilt_deg == pytest.approx(45.0)


def test_duplicate_positions_give_zero_spacing_quietly() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by the zero spacing
        g = analyse_stack(AXIAL, _axial_stack([0.0, 0.0, 2.0, 4.0, 6.0]))
    assert g.spacing == 0.0 and not g.uniform and g.missing_slices == 0


def test_missing_slices_are_counted_from_whole_multiples() -> None:
    g = analyse_stack(AXIAL, _axial_stack([0.0, 2.0, 4.0, 10.0, 12.0]))  # 6 mm = 3 gaps: 2 slices missing
    assert g.spacing == 2.0 and not g.uniform and g.missing_slices == 2
    g = analyse_stack(AXIAL, _axial_stack([0.0, 2.0, 4.0, 8.0, 10.0, 14.0]))
    assert g.spacing == 2.0 and not g.uniform and g.missing_slices == 2


def test_half_size_gaps_make_the_smallest_gap_nominal() -> None:
    # median 2, smallest 1 = exactly half the median: not "more than half", so the smallest gap is nominal
    # and the 2 mm gaps are each one missing slice
    g = analyse_stack(AXIAL, _axial_stack([0.0, 1.0, 3.0, 5.0, 7.0]))
    assert g.spacing == 1.0 and not g.uniform and g.missing_slices == 3
    # just more than half: the median is nominal; 1.1 mm is not a whole multiple of 2 mm
    g = analyse_stack(AXIAL, _axial_stack([0.0, 1.1, 3.1, 5.1, 7.1]))
    assert g.spacing == pytest.approx(2.0) and not g.uniform and g.missing_slices == 0


def test_irregular_gaps_are_not_missing_slices() -> None:
    g = analyse_stack(AXIAL, _axial_stack([0.0, 2.0, 4.0, 7.0, 9.0]))  # a 3 mm gap in 2 mm spacing
    assert g.spacing == 2.0 and not g.uniform and g.missing_slices == 0
    assert np.allclose(g.gaps, (2.0, 2.0, 3.0, 2.0))
    # 85 mm in 50 mm spacing is 1.7 gaps, 15 mm (not within 0.5 mm) from two: no missing slice
    # (guards the distance to a whole multiple measured in gaps instead of mm)
    g = analyse_stack(AXIAL, _axial_stack([0.0, 50.0, 100.0, 185.0, 235.0]))
    assert g.spacing == 50.0 and not g.uniform and g.missing_slices == 0


def test_a_uniform_stack_has_no_missing_slices_even_where_the_tolerance_is_wide() -> None:
    # 1 micrometre spacing: the absolute tolerance (1 micrometre) takes a 1.8 um gap as uniform; it must not
    # also be read as two gaps (one missing slice)
    g = analyse_stack(AXIAL, _axial_stack([0.0, 0.001, 0.002, 0.0038]))
    assert g.uniform and g.missing_slices == 0


def test_gap_tolerance_is_relative_with_an_absolute_floor() -> None:
    # exactly at the tolerance is uniform: 1 % of 100 mm = 1 mm (exact in floating point)
    assert analyse_stack(AXIAL, _axial_stack([0.0, 100.0, 200.0, 301.0])).uniform
    # relative: 1% of 2 mm = 0.02 mm
    assert analyse_stack(AXIAL, _axial_stack([0.0, 2.0, 4.0, 6.015])).uniform
    g = analyse_stack(AXIAL, _axial_stack([0.0, 2.0, 4.0, 6.03]))
    assert not g.uniform and g.missing_slices == 0
    # a gap off by a whole slice within the tolerance is still one missing slice
    g = analyse_stack(AXIAL, _axial_stack([0.0, 2.0, 4.0, 8.015]))
    assert not g.uniform and g.missing_slices == 1
    # absolute floor: 1% of 0.05 mm (0.0005) is below GAP_ABS_TOL (0.001), which then applies
    z = [0.0, 0.05, 0.10, 0.15 + 0.8 * GAP_ABS_TOL]
    assert analyse_stack(AXIAL, _axial_stack(z)).uniform
    z = [0.0, 0.05, 0.10, 0.15 + 1.5 * GAP_ABS_TOL]
    assert not analyse_stack(AXIAL, _axial_stack(z)).uniform
    # on a whole-multiple gap, the floor decides too: 0.1008 mm is two 0.05 mm gaps within 0.001 mm
    g = analyse_stack(AXIAL, _axial_stack([0.0, 0.05, 0.10, 0.2008]))
    assert not g.uniform and g.missing_slices == 1


def test_tilted_stack_and_inplane_offsets() -> None:
    """Coronal slices (normal +y), each slice shifted 1 mm along x (the row) and 0.5 mm in -z (the
    column), 2 mm apart: tilt = atan(|(1, 0.5)| / 2)."""
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, -0.5], [2.0, 4.0, -1.0]])
    g = analyse_stack(CORONAL, pos + (7.0, -3.0, 11.0))
    assert g.spacing == 2.0 and g.uniform
    assert np.allclose(g.distances, (0.0, 2.0, 4.0))
    assert np.allclose(g.inplane_offsets, [[0.0, 0.0], [1.0, 0.5], [2.0, 1.0]])
    assert g.tilt_deg == pytest.approx(math.degrees(math.atan(math.hypot(1.0, 0.5) / 2.0)))


def test_tilt_is_measured_between_the_first_and_the_last_slice() -> None:
    # only the last slice is shifted (3 mm along x over 6 mm along the normal y)
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [3.0, 6.0, 0.0]])
    g = analyse_stack(CORONAL, pos)
    assert g.tilt_deg == pytest.approx(math.degrees(math.atan(3.0 / 6.0)))


def test_stack_stored_against_the_normal() -> None:
    """Slices sorted head to feet with the normal passed reversed (as series planning does)."""
    pos = np.array([[0.0, 0.0, 9.0], [0.0, 0.3, 6.0], [0.0, 0.6, 3.0]])
    g = analyse_stack(AXIAL, pos, normal=np.array([0, 0, -1]))
    assert np.array_equal(g.normal, (0.0, 0.0, -1.0)) and g.normal.dtype == np.float64
    assert np.allclose(g.distances, (0.0, 3.0, 6.0)) and g.spacing == pytest.approx(3.0)
    assert g.tilt_deg == pytest.approx(math.degrees(math.atan(0.6 / 6.0)))
    assert np.allclose(g.inplane_offsets, [[0.0, 0.0], [0.0, 0.3], [0.0, 0.6]])
    # the default normal sees the same stack running backwards; its tilt is still the angle to the normal's
    # line (5.7 degrees, not 174.3)
    backwards = analyse_stack(AXIAL, pos)
    assert np.allclose(backwards.distances, (0.0, -3.0, -6.0))
    assert backwards.tilt_deg == pytest.approx(g.tilt_deg)


def test_analyse_stack_accepts_decimal_values() -> None:
    pos = [_decimal((0.0, 0.0, z)) for z in (0.0, 1.5, 3.0, 4.5)]
    g = analyse_stack(_decimal(AXIAL), pos, normal=_decimal((0.0, 0.0, 1.0)))
    assert g.spacing == 1.5 and g.uniform and g.tilt_deg == 0.0
    assert g.distances.dtype == np.float64 and np.allclose(g.distances, (0.0, 1.5, 3.0, 4.5))
