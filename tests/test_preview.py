"""The PNG preview shows the patient the radiological way, whatever the voxel order of the volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpipe.dicom.geometry import voxel_to_world
from medpipe.dicom.preview import write_preview

AXIAL = (1, 0, 0, 0, 1, 0)
SAGITTAL = (0, 1, 0, 0, 0, -1)


@pytest.mark.parametrize("iop", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_blob_at_patient_right_anterior_shows_top_left_of_axial_panel(tmp_path: Path, iop: tuple) -> None:
    n = 40
    affine = voxel_to_world(iop, (-50.0, -50.0, -50.0), (2.5, 2.5), 2.5, rows=n)
    # put a bright blob at the world (RAS) point right + anterior of the centre, at the centre height
    centre = affine @ np.array([(n - 1) / 2] * 3 + [1.0])
    target = centre[:3] + np.array([+15.0, +15.0, 0.0])  # R is +x, A is +y in RAS
    ijk = np.round(np.linalg.solve(affine, np.append(target, 1.0))[:3]).astype(int)
    vol = np.zeros((n, n, n), np.float32)
    vol[tuple(slice(c - 2, c + 3) for c in ijk)] = 1000
    write_preview(vol, affine, tmp_path / "p.png", "test")
    img = np.asarray(Image.open(tmp_path / "p.png"))
    axial = img[24:24 + 256, 6:6 + 256]  # first panel below the title
    ys, xs = np.nonzero(axial > 200)
    assert len(xs) > 0
    # radiological: patient's right on the viewer's left, anterior up
    assert xs.mean() < 128 and ys.mean() < 128


CORONAL = (1, 0, 0, 0, 0, -1)


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, SAGITTAL], ids=["axial", "coronal", "sagittal"])
def test_every_panel_shows_its_plane_the_radiological_way(tmp_path: Path, iop: tuple) -> None:
    """Guards: coronal and sagittal panels flipped or swapped (the test above checks the axial panel only).

    Three blobs, each in the middle plane of one panel only: right+anterior (axial), right+superior (coronal),
    anterior+superior (sagittal). Radiological display: R on the viewer's left, A and S up, A on the left of
    the sagittal panel."""
    n = 40
    affine = voxel_to_world(iop, (-50.0, -50.0, -50.0), (2.5, 2.5), 2.5, rows=n)
    centre = (affine @ np.array([(n - 1) / 2] * 3 + [1.0]))[:3]
    vol = np.zeros((n, n, n), np.float32)
    for offset in ((15.0, 15.0, 0.0), (15.0, 0.0, 15.0), (0.0, 15.0, 15.0)):  # (R, A, S) mm from the centre
        ijk = np.round(np.linalg.solve(affine, np.append(centre + np.array(offset), 1.0))[:3]).astype(int)
        vol[tuple(slice(c - 2, c + 3) for c in ijk)] = 1000
    write_preview(vol, affine, tmp_path / "p.png", "")
    img = np.asarray(Image.open(tmp_path / "p.png"))
    for k, name in enumerate(("axial", "coronal", "sagittal")):
        panel = img[24:24 + 256, 6 + k * 262:6 + k * 262 + 256].astype(int)
        inner = panel[16:-16, 16:-16]  # the direction letters sit on the panel's edges
        ys, xs = np.nonzero(inner > 200)
        assert len(xs) > 0, name
        assert xs.mean() + 16 < 128 and ys.mean() + 16 < 128, f"{name}: blob not top-left ({xs.mean()}, {ys.mean()})"
        assert np.ptp(xs) < 40 and np.ptp(ys) < 40, f"{name}: more than its own blob is visible"
