"""Box geometry of the detector's data path (:mod:`medpipe.data.detection`): a nodule given in world mm by the DICOM
SR lands on the right voxels of the preprocessed image for every acquisition the chest CT sample makes (head-first
axial, feet-first, prone, gantry-tilted), and detections map back to world mm.

Checked from first principles: the DICOM slices' own ImagePositionPatient / ImageOrientationPatient /
PixelSpacing say which source pixel holds the nodule's centre, and its HU must be the nodule's; the preprocessed
image (RAS, resampled, cropped) must hold the same tissue at the box centre, and every voxel inside the box must lie
inside the nodule's world cube.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medpipe.data.detection import LPS_TO_RAS, box_centres_world, detection_item, detector_transforms, world_boxes
from medpipe.sample.chest_ct import ChestCase, generate_chest_ct

#: four small studies, one per acquisition, each with a nodule of 14 mm or more (seed 9)
TINY = {"matrix": 64, "min_thickness": 5.0, "max_thickness": 5.0, "nodule_free_fraction": 0.0}
PIXDIM = (4.0, 4.0, 4.0)
HU = (-1000.0, 500.0)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ChestCase]]:
    out = tmp_path_factory.mktemp("chest")
    return out, generate_chest_ct(out, cases=4, seed=9, **TINY)


@pytest.fixture(scope="module")
def ingested(sample: tuple[Path, list[ChestCase]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medpipe.ingest import ingest

    out = tmp_path_factory.mktemp("chest_ingest")
    ingest(sample[0], out)
    return out


def _source_hu(series_dir: Path, lps: np.ndarray) -> float:
    """HU of the DICOM pixel nearest to ``lps``, from the slices' own headers (the slice whose plane is nearest)."""
    best = None
    for path in sorted(series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        d = abs(float(np.dot(lps - ipp, normal)))
        if best is None or d < best[0]:
            best = (d, ds, ipp, row, col)
    assert best is not None
    _, ds, ipp, row, col = best
    ps = np.asarray(ds.PixelSpacing, float)
    c = round(float(np.dot(lps - ipp, row)) / ps[1])
    r = round(float(np.dot(lps - ipp, col)) / ps[0])
    return float(ds.pixel_array[r, c]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _items(ingested: Path, tmp_path: Path) -> list[dict]:
    from medpipe.data.channels import ChannelRule
    from medpipe.data.datalist_builder import SrLabels, build_items

    return build_items(ingested, {"CT": ChannelRule(modality="CT")}, "CT", SrLabels(source="sr"),
                       work_dir=tmp_path).items


def test_world_box_of_a_finding() -> None:
    boxes = world_boxes([{"center_lps": [10.0, -20.0, 30.0], "diameter_mm": 8.0}])
    assert boxes.tolist() == [[-10.0, 20.0, 30.0, 8.0, 8.0, 8.0]]  # RAS centre, then the sides
    assert world_boxes([]).shape == (0, 6) and world_boxes(None).shape == (0, 6)


def test_box_centres_world_inverts_the_affine() -> None:
    affine = np.array([[-2.0, 0, 0, 100], [0, 0, 3.0, -50], [0, 2.5, 0, 10], [0, 0, 0, 1]])  # flipped, permuted
    ijk = np.array([4.0, 6.0, 8.0])
    ras = affine[:3, :3] @ ijk + affine[:3, 3]
    box = np.array([[*(ijk - [1, 2, 3]), *(ijk + [1, 2, 3])]])
    centres, diam = box_centres_world(box, affine)
    np.testing.assert_allclose(centres[0], LPS_TO_RAS @ ras)
    assert diam[0] == pytest.approx(np.mean([2 * 1 * 2.0, 2 * 2 * 2.5, 2 * 3 * 3.0]))


def test_nodule_boxes_land_on_the_nodules_for_every_acquisition(
        ingested: Path, sample: tuple[Path, list[ChestCase]], tmp_path: Path) -> None:
    cases = {c.patient_id: c for c in sample[1]}
    transform = detector_transforms(pixdim=PIXDIM, hu_window=HU, train=False)
    seen = set()
    for item in _items(ingested, tmp_path):
        case = cases[item["patient_id"]]
        out = transform(detection_item(item))
        image, boxes = out["image"], np.asarray(out["box"])
        affine = np.asarray(image.affine, dtype=np.float64)
        assert boxes.shape == (len(case.nodules), 6), case.acquisition
        # detections in voxel coordinates map back to the SR's world centres and diameters
        centres, diam = box_centres_world(boxes, affine)
        truth = np.array([f["center_lps"] for f in item["findings"]]).reshape(-1, 3)
        np.testing.assert_allclose(centres, truth, atol=1e-3)
        np.testing.assert_allclose(diam, [f["diameter_mm"] for f in item["findings"]], rtol=1e-4)
        inv = np.linalg.inv(affine)
        grid = np.indices(image.shape[1:]).reshape(3, -1).T.astype(np.float64)
        for f, box in zip(item["findings"], boxes, strict=True):
            c_lps = np.asarray(f["center_lps"], float)
            r = f["diameter_mm"] / 2
            # the voxels inside the box are those whose centres lie in the nodule's world cube (any flips / crop)
            inside = np.all((grid >= box[:3]) & (grid <= box[3:]), axis=1)
            world = grid @ affine[:3, :3].T + affine[:3, 3]
            cube = np.all(np.abs(world - LPS_TO_RAS @ c_lps) <= r + 1e-3, axis=1)
            np.testing.assert_array_equal(inside, cube)
            if f["diameter_mm"] < 12:  # smaller ones are partial-volumed at 4 mm and 5 mm slices
                continue
            seen.add(case.acquisition)
            hu = _source_hu(case.series_dir, c_lps)
            assert hu > -300, (case.acquisition, f, hu)
            ijk = np.rint(inv[:3, :3] @ (LPS_TO_RAS @ c_lps) + inv[:3, 3]).astype(int)
            value = float(image[0][tuple(ijk)]) * (HU[1] - HU[0]) + HU[0]
            assert value > -400, (case.acquisition, f, value)
            centre_voxel = np.rint((box[:3] + box[3:]) / 2).astype(int)
            np.testing.assert_array_equal(centre_voxel, ijk)
    assert seen == {"axial", "feet-first", "prone", "tilted"}, seen


def test_training_patches_keep_boxes_on_their_nodules(ingested: Path, tmp_path: Path) -> None:
    """Random crops, flips and 90-degree rotations move image and boxes together: every box in a positive patch still
    sits on dense tissue (the nodule) after augmentation."""
    transform = detector_transforms(pixdim=PIXDIM, hu_window=HU, train=True, patch_size=(32, 32, 32), num_samples=4,
                                    pos=1.0, neg=0.0)
    transform.set_random_state(seed=0)
    checked = 0
    for item in _items(ingested, tmp_path):
        big = [f for f in item["findings"] if f["diameter_mm"] >= 12]
        if not big or len(big) != len(item["findings"]):
            continue
        for patch in transform(detection_item(item)):
            image = np.asarray(patch["image"][0])
            assert image.shape == (32, 32, 32)
            for box in np.asarray(patch["box"]):
                centre = np.clip(np.rint((box[:3] + box[3:]) / 2).astype(int), 0, 31)
                if np.any(box[:3] <= 0) or np.any(box[3:] >= 32):
                    continue  # a box clipped at the patch border: its centre moved
                assert image[tuple(centre)] * (HU[1] - HU[0]) + HU[0] > -400
                checked += 1
    assert checked >= 2


def test_key_image_pixel_is_the_finding_on_every_acquisition(sample: tuple[Path, list[ChestCase]]) -> None:
    """``medpipe score``'s key image: the source slice nearest to a finding and the finding's pixel there, from the
    slices' own geometry; the pixel's centre lies within half a slice (along the normal) and half a pixel (in plane)
    of the finding, for axial, feet-first, prone and tilted series."""
    from medpipe.dicom.frames import frame_geometries
    from medpipe.scoring.results import nearest_frame

    for case in sample[1]:
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(case.series_dir.glob("*.dcm"))]
        frames = frame_geometries(datasets)
        for n in case.nodules:
            c = np.asarray(n["center_lps"], dtype=float)
            i, (r, col) = nearest_frame(frames, tuple(c))
            fr = frames[i]
            iop = np.asarray(fr.orientation, float)
            pixel = (np.asarray(fr.position, float) + round(col) * fr.pixel_spacing[1] * iop[:3]
                     + round(r) * fr.pixel_spacing[0] * iop[3:])
            normal = np.cross(iop[:3], iop[3:])
            d = pixel - c
            assert abs(float(d @ normal)) <= case.slice_thickness / 2 + 1e-3, (case.acquisition, n)
            in_plane = d - (d @ normal) * normal
            assert np.all(np.abs(in_plane) <= max(fr.pixel_spacing) / 2 * np.sqrt(2) + 1e-3), (case.acquisition, n)
