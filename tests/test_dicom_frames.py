"""The frame mapping between medpipe volumes and source DICOM frames, and deterministic UIDs.

Layout functions against ingest itself, world-space sampling against the layout (exact on the
series' own grid), off-grid interpolation by hand, and per-frame geometry of enhanced multi-frame
objects against what ingest built from them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from medpipe.dicom.frames import (
    FrameGeometry,
    derived_frame_sources,
    frame_geometries,
    frame_to_slice,
    frames_to_grid,
    frames_to_volume,
    instance_uid,
    sample_frames,
    slice_to_frame,
    source_frame_index,
    volume_to_frames,
)
from medpipe.dicom.uids import derive_uid
from medpipe.errors import DicomError
from medpipe.ingest import ingest
from tests.ingested import Ingested, axial_series, two_blocks


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    return axial_series(tmp_path_factory.mktemp("axial"))


# -- uids -----------------------------------------------------------------------------------------------


def test_derive_uid_is_a_deterministic_uuid_uid() -> None:
    a = derive_uid("medpipe", "x", 1)
    assert a == derive_uid("medpipe", "x", 1) and a != derive_uid("medpipe", "x", 2)
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert a.startswith("2.25.") and len(a) <= 64 and pydicom.uid.UID(a).is_valid
    u = uuid.UUID(int=int(a[5:]))
    assert u.version == 8 and u.variant == uuid.RFC_4122


# -- frame mapping --------------------------------------------------------------------------------------


def test_layout_functions_are_ingests_layout_and_its_inverse(axial: Ingested) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 100, (12, 16))
    assert np.array_equal(frame_to_slice(frame), frame[::-1, :].T)
    assert np.array_equal(slice_to_frame(frame_to_slice(frame)), frame)
    vol = rng.integers(0, 100, (16, 12, 8, 3))
    assert np.array_equal(frames_to_volume(volume_to_frames(vol)), vol)
    assert np.array_equal(volume_to_frames(vol)[5], slice_to_frame(vol[:, :, 5]))
    # ingest's volume, mapped back, is the source pixels in sidecar order
    pixels = {instance_uid(d): d.pixel_array for d in (pydicom.dcmread(p) for p in axial.files)}
    stored = np.stack([pixels[u] for u in axial.sidecar["SourceSOPInstanceUIDs"]])
    assert np.array_equal(volume_to_frames(axial.volume), stored)


def test_sampling_on_the_source_grid_is_the_layout_exactly(axial: Ingested) -> None:
    frames = frame_geometries(axial.sources)
    assert [f.sop_instance_uid for f in frames] == axial.sidecar["SourceSOPInstanceUIDs"]
    labels = two_blocks(axial.volume.shape)
    assert np.array_equal(sample_frames(labels, axial.affine, frames), volume_to_frames(labels))
    assert sample_frames(labels, axial.affine, frames).dtype == np.uint8
    smooth = axial.volume / 7.0  # float values: linear interpolation at voxel centres is exact too
    assert np.array_equal(sample_frames(smooth, axial.affine, frames, interpolation="linear"), volume_to_frames(smooth))
    both = np.stack([labels, labels * 2], axis=-1)  # trailing axes are carried along
    assert np.array_equal(sample_frames(both, axial.affine, frames), volume_to_frames(both))


def test_sampling_off_grid_and_outside() -> None:
    """Between voxel centres: linear interpolation; beyond the grid's half-voxel border: ``fill``."""
    data = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel (i, j, k) is at LPS (i, j, k)
    # 3 rows along -y from j = 2, 6 columns along +x from i = -0.5, halfway between slices k = 0 and 1
    frame = FrameGeometry("1.2.3", None, (-0.5, 2.0, 0.5), (1, 0, 0, 0, -1, 0), (1.0, 1.0), 3, 6)
    linear = sample_frames(data, affine, [frame], interpolation="linear", fill=-1)[0]
    nearest = sample_frames(data, affine, [frame], fill=-1)[0]
    both = data.mean(axis=2)
    for r in range(3):
        j = 2 - r
        assert linear[r, 0] == both[0, j]  # half a voxel before i = 0: the border voxel's value
        for c in (1, 2, 3):  # i = 0.5, 1.5, 2.5
            assert linear[r, c] == pytest.approx((both[c - 1, j] + both[c, j]) / 2)
        assert list(linear[r, 4:]) == [-1, -1]  # i = 3.5 rounds to voxel 4: outside
        assert list(nearest[r]) == [data[0, j, 1], data[1, j, 1], data[2, j, 1], data[3, j, 1], -1, -1]
    with pytest.raises(DicomError, match="does not fit the uint8 output"):
        sample_frames(data.astype(np.uint8), affine, [frame], fill=-1)


def test_frame_geometries_of_enhanced_multiframe(shared_data: Path, tmp_path: Path) -> None:
    """Per-frame functional groups: every part ingest made of the Philips field map is its frames, exactly."""
    path = shared_data / "dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = frame_geometries([ds])
    assert len(frames) == 64 and [f.frame_number for f in frames] == list(range(1, 65))
    fg = ds.PerFrameFunctionalGroupsSequence[40]
    assert frames[40].position == tuple(float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient)
    report = ingest(path, tmp_path / "out", workers=1)
    assert len(report.volumes) == 2
    for row in report.volumes:
        side = json.loads((tmp_path / "out" / row["sidecar"]).read_text())
        img = nib.load(tmp_path / "out" / row["volume"])
        vol = np.asarray(img.get_fdata(dtype=np.float32))
        mine = [frames[n - 1] for n in side["SourceFrameNumbers"]]
        assert np.array_equal(sample_frames(vol, img.affine, mine, interpolation="linear"), volume_to_frames(vol))


def test_frame_geometries_refuse_what_has_no_frames() -> None:
    ds = Dataset()
    ds.SOPInstanceUID, ds.Rows, ds.Columns = "1.2.3", 4, 4
    with pytest.raises(DicomError, match="no image plane geometry"):
        frame_geometries([ds])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
    with pytest.raises(DicomError, match="mosaic"):
        frame_geometries([ds])


# -- frames back onto a grid, frame bookkeeping (found by mutation testing: untested before) -----------------


def test_frames_to_grid_inverts_sampling_in_any_frame_order(axial: Ingested) -> None:
    frames = frame_geometries(axial.sources)
    labels = two_blocks(axial.volume.shape)
    pix = sample_frames(labels, axial.affine, frames)
    back = frames_to_grid(pix, frames, axial.affine, labels.shape)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    rev = frames[::-1]  # the frames' order is not the slice order: they are sorted along the normal
    assert np.array_equal(frames_to_grid(pix[::-1], rev, axial.affine, labels.shape), labels)
    # a frame missing (a SEG omits empty frames): its slice comes from the nearer neighbour within half the
    # gap, unless reach (mm) says the frames are a subset; the grid beyond the stack is fill
    keep = [k for k in range(len(frames)) if k != 3]
    part = [frames[k] for k in keep]
    spacing = float(np.linalg.norm(axial.affine[:3, 2]))
    gap = frames_to_grid(pix[keep], part, axial.affine, labels.shape, fill=9)
    assert np.array_equal(gap[:, :, keep], labels[:, :, keep])
    assert np.array_equal(gap[:, :, 3], labels[:, :, 4])  # tie between slices 2 and 4: the one after
    cut = frames_to_grid(pix[keep], part, axial.affine, labels.shape, fill=9, reach=spacing / 2)
    assert (cut[:, :, 3] == 9).all() and np.array_equal(cut[:, :, keep], labels[:, :, keep])
    # the end frames reach half their neighbour's spacing beyond themselves, no further
    big = np.eye(4)
    big[:3, :3] = axial.affine[:3, :3]
    big[:3, 3] = axial.affine[:3, 3] - axial.affine[:3, :3] @ np.array([1.0, 1.0, 1.0])  # one voxel more each side
    wide = frames_to_grid(pix, frames, big, (18, 14, 10), fill=9)
    assert np.array_equal(wide[1:17, 1:13, 1:9], labels)
    assert (wide[0] == 9).all() and (wide[17] == 9).all() and (wide[:, 0] == 9).all() and (wide[:, 13] == 9).all()
    assert (wide[:, :, 0] == 9).all() and (wide[:, :, 9] == 9).all()


def test_frames_to_grid_takes_the_pixel_within_half_a_pixel_on_a_sheared_stack() -> None:
    """Two axial frames of 2x3 pixels (row spacing 2, column spacing 1) on a 1 mm grid, the second
    shifted by one column (a tilted gantry): each voxel takes the nearest pixel of its own frame."""
    lps_grid = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel (i, j, k) at LPS (i, j, k)
    f0 = FrameGeometry("1.1", None, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (2.0, 1.0), 2, 3)
    f1 = FrameGeometry("1.2", None, (1.0, 0.0, 1.0), (1, 0, 0, 0, 1, 0), (2.0, 1.0), 2, 3)
    pix = np.array([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]], dtype=np.int16)
    g = frames_to_grid(pix, [f0, f1], lps_grid, (5, 4, 2), fill=-1)
    assert g.dtype == np.int16
    # frame 0: column c at x = c, row r at y = 2 r; y = 1 is half a row from both: rint(0.5) = 0
    assert g[:, :, 0].T.tolist() == [[1, 2, 3, -1, -1], [1, 2, 3, -1, -1], [4, 5, 6, -1, -1], [-1] * 5]
    assert g[:, :, 1].T.tolist() == [[-1, 7, 8, 9, -1], [-1, 7, 8, 9, -1], [-1, 10, 11, 12, -1], [-1] * 5]


def test_frames_to_grid_refuses_frames_that_are_not_one_stack() -> None:
    f0 = FrameGeometry("1.1", None, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (1.0, 1.0), 2, 3)
    f1 = FrameGeometry("1.2", None, (0.0, 0.0, 1.0), (1, 0, 0, 0, 1, 0), (1.0, 1.0), 2, 3)
    pix = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(DicomError, match=r"^1 frames of pixels for 2 frame geometries$"):
        frames_to_grid(pix[:1], [f0, f1], np.eye(4), (3, 2, 2))
    with pytest.raises(DicomError, match=r"^0 frames of pixels for 0 frame geometries$"):
        frames_to_grid(pix[:0], [], np.eye(4), (3, 2, 2))
    tilted = FrameGeometry("1.2", None, (0.0, 0.0, 1.0), (1, 0, 0, 0, 0.8, 0.6), (1.0, 1.0), 2, 3)
    finer = FrameGeometry("1.2", None, (0.0, 0.0, 1.0), (1, 0, 0, 0, 1, 0), (0.5, 1.0), 2, 3)
    for other in (tilted, finer):
        with pytest.raises(DicomError, match="^frames of different orientations, sizes or pixel spacings"):
            frames_to_grid(pix, [f0, other], np.eye(4), (3, 2, 2))
    # orientations within 1e-4 (rounding in the header) are one stack
    nearly = FrameGeometry("1.2", None, (0.0, 0.0, 1.0), (1, 0, 0, 0, 1, 1e-4), (1.0, 1.0), 2, 3)
    assert frames_to_grid(pix, [f0, nearly], np.eye(4), (3, 2, 2)).shape == (3, 2, 2)
    with pytest.raises(DicomError, match=r"^pixels of shape \(3, 2\) do not fit frames of 2x3$"):
        frames_to_grid(np.zeros((2, 3, 2), np.uint8), [f0, f1], np.eye(4), (3, 2, 2))


def test_pixel_centres_and_frame_bookkeeping() -> None:
    f = FrameGeometry("1.1", 2, (10.0, -5.0, 3.0), (0, 1, 0, 0, 0, -1), (2.0, 0.5), 3, 4)  # sagittal
    centres = f.pixel_centres()
    assert centres.shape == (3, 4, 3)
    for r in range(3):
        for c in range(4):  # LPS: position + column index along the row direction, row index along the column one
            lps = np.array([10.0, -5.0, 3.0]) + c * 0.5 * np.array([0, 1, 0]) + r * 2.0 * np.array([0, 0, -1])
            assert np.allclose(centres[r, c], lps * [-1, -1, 1])
    g = FrameGeometry("1.1", 5, (10.0, -5.0, 3.0), (0, 1, 0, 0, 0, -1), (2.0, 0.5), 3, 4)
    assert source_frame_index([f, g]) == {("1.1", 2): 0, ("1.1", 5): 1}
    ds = Dataset()
    items = []
    for uid, number in (("1.2.3", 7), ("1.2.4", None), (None, None)):
        fg = Dataset()
        if uid is not None:
            src = Dataset()
            src.ReferencedSOPInstanceUID = uid
            if number is not None:
                src.ReferencedFrameNumber = number
            der = Dataset()
            der.SourceImageSequence = [src]
            fg.DerivationImageSequence = [der]
        items.append(fg)
    ds.PerFrameFunctionalGroupsSequence = items
    assert derived_frame_sources(ds) == [("1.2.3", 7), ("1.2.4", None), (None, None)]
    assert derived_frame_sources(Dataset()) == []


def test_instance_uid_falls_back_to_the_file_meta() -> None:
    from pydicom.dataset import FileMetaDataset

    ds = Dataset()
    assert instance_uid(ds) == ""  # neither: blank, no file meta
    ds.file_meta = FileMetaDataset()
    assert instance_uid(ds) == ""  # a file meta without the UID
    ds.file_meta.MediaStorageSOPInstanceUID = "1.9"
    assert instance_uid(ds) == "1.9"
    ds.SOPInstanceUID = ""
    assert instance_uid(ds) == "1.9"  # blank own UID: the file meta's
    ds.SOPInstanceUID = "1.2.3"
    assert instance_uid(ds) == "1.2.3"  # the dataset's own first


def _plane(**kw: object) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID, ds.Rows, ds.Columns = "1.2.3", 4, 5
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [1, 2, 3], [1, 0, 0, 0, 1, 0], [0.5, 0.7]
    for k, v in kw.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # a lowercase CS and a NaN DS, on purpose
def test_frame_geometries_of_a_classic_instance_and_what_they_refuse() -> None:
    assert frame_geometries([_plane(NumberOfFrames=1)]) == [
        FrameGeometry("1.2.3", None, (1.0, 2.0, 3.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.5, 0.7), 4, 5)]
    refused = [
        (_plane(SOPInstanceUID=None), r"^source dataset has no SOP Instance UID$"),
        (_plane(Rows=None), r"^SOP instance 1\.2\.3: no Rows / Columns$"),
        (_plane(Columns=0), r"^SOP instance 1\.2\.3: no Rows / Columns$"),
        (_plane(ImageType=["ORIGINAL", "PRIMARY", "M", "mosaic"]),
         r"^SOP instance 1\.2\.3: a Siemens mosaic holds many slices in one frame; DICOM results cannot be written"),
        (_plane(NumberOfFrames=2), r"^SOP instance 1\.2\.3: multi-frame object without per-frame functional groups$"),
        (_plane(ImagePositionPatient=[1, 2]), r"^SOP instance 1\.2\.3: ImagePositionPatient must hold 3 numbers, got"),
        (_plane(ImageOrientationPatient=[1, 0, 0, 0, 1, "nan"]),
         r"^SOP instance 1\.2\.3: ImageOrientationPatient must hold 6 numbers, got"),
        (_plane(PixelSpacing=[0.5]), r"^SOP instance 1\.2\.3: PixelSpacing must hold 2 numbers, got"),
    ]
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        refused.append((_plane(**{name: None}), (r"^SOP instance 1\.2\.3: no image plane geometry \("
                                                 r"ImagePositionPatient / ImageOrientationPatient / PixelSpacing\)$")))
    for ds, message in refused:
        with pytest.raises(DicomError, match=message):
            frame_geometries([ds])


def _enhanced_ds(n_frames: int | None = 2, shared: bool = True) -> Dataset:
    def seq(name: str, **values: object) -> list[Dataset]:
        item = Dataset()
        for k, v in values.items():
            setattr(item, k, v)
        return [item]

    ds = Dataset()
    ds.SOPInstanceUID, ds.Rows, ds.Columns = "1.2.9", 3, 2
    if n_frames is not None:
        ds.NumberOfFrames = n_frames
    frames = []
    for z in (0.0, 2.0):
        fg = Dataset()
        fg.PlanePositionSequence = seq("p", ImagePositionPatient=[0, 0, z])
        frames.append(fg)
    sh = Dataset()
    sh.PlaneOrientationSequence = seq("o", ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    sh.PixelMeasuresSequence = seq("m", PixelSpacing=[0.8, 0.9])
    if shared:
        ds.SharedFunctionalGroupsSequence = [sh]
    else:
        for fg in frames:
            fg.PlaneOrientationSequence, fg.PixelMeasuresSequence = sh.PlaneOrientationSequence, sh.PixelMeasuresSequence
    frames[1].PlaneOrientationSequence = seq("o", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])  # per frame wins
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


def test_frame_geometries_of_enhanced_functional_groups_by_hand() -> None:
    want = [FrameGeometry("1.2.9", 1, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.8, 0.9), 3, 2),
            FrameGeometry("1.2.9", 2, (0.0, 0.0, 2.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (0.8, 0.9), 3, 2)]
    assert frame_geometries([_enhanced_ds()]) == want
    assert frame_geometries([_enhanced_ds(n_frames=None)]) == want  # the count of functional groups
    assert frame_geometries([_enhanced_ds(shared=False)]) == want
    with pytest.raises(DicomError, match=r"^SOP instance 1\.2\.9: 2 per-frame functional groups for 3 frames$"):
        frame_geometries([_enhanced_ds(n_frames=3)])
    ds = _enhanced_ds()
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(DicomError, match=r"^SOP instance 1\.2\.9: frame 2 has no plane position / orientation / pixel"):
        frame_geometries([ds])
    ds = _enhanced_ds()
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    with pytest.raises(DicomError, match=r"frame 1 has no plane position / orientation / pixel spacing$"):
        frame_geometries([ds])
    ds = _enhanced_ds()
    del ds.SharedFunctionalGroupsSequence
    with pytest.raises(DicomError, match=r"frame 1 has no plane position"):
        frame_geometries([ds])


def test_frame_geometries_of_one_pixel_frames_and_of_mixed_instances() -> None:
    one = frame_geometries([_plane(Rows=1, Columns=1)])
    assert [(f.rows, f.columns) for f in one] == [(1, 1)]
    mixed = frame_geometries([_enhanced_ds(), _plane()])  # an enhanced instance does not end the list
    assert [(f.sop_instance_uid, f.frame_number) for f in mixed] == [("1.2.9", 1), ("1.2.9", 2), ("1.2.3", None)]


def test_enhanced_frame_values_are_checked_per_frame() -> None:
    for seq, name, bad, message in (
        ("PlanePositionSequence", "ImagePositionPatient", [0, 0], "ImagePositionPatient must hold 3 numbers"),
        ("PlaneOrientationSequence", "ImageOrientationPatient", [1, 0, 0, 0, 1],
         "ImageOrientationPatient must hold 6 numbers"),
        ("PixelMeasuresSequence", "PixelSpacing", [0.8], "PixelSpacing must hold 2 numbers"),
    ):
        ds = _enhanced_ds(shared=False)
        setattr(getattr(ds.PerFrameFunctionalGroupsSequence[1], seq)[0], name, bad)
        with pytest.raises(DicomError, match=rf"^SOP instance 1\.2\.9: {message}, got"):
            frame_geometries([ds])
    ds = _enhanced_ds(shared=False)
    del ds.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence  # orientation alone missing
    with pytest.raises(DicomError, match=r"^SOP instance 1\.2\.9: frame 1 has no plane position"):
        frame_geometries([ds])


def test_sample_frames_refusals_say_what_is_wrong() -> None:
    f = FrameGeometry("1.1", None, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (1.0, 1.0), 2, 3)
    g = FrameGeometry("1.2", None, (0.0, 0.0, 1.0), (1, 0, 0, 0, 1, 0), (1.0, 1.0), 3, 3)
    data = np.zeros((3, 3, 2))
    with pytest.raises(DicomError, match=r"^interpolation must be 'nearest' or 'linear', not 'cubic'$"):
        sample_frames(data, np.eye(4), [f], interpolation="cubic")  # type: ignore[arg-type]
    with pytest.raises(DicomError, match=r"^no frames to sample$"):
        sample_frames(data, np.eye(4), [])
    with pytest.raises(DicomError, match=r"^source frames have different sizes \[\(2, 3\), \(3, 3\)\]: sample each"):
        sample_frames(data, np.eye(4), [f, g])


def _column_stack(zs: list[float]) -> tuple[np.ndarray, list[FrameGeometry]]:
    """One-pixel axial frames at LPS (0, 0, z) holding 1, 2, ...: each voxel of a 1x1 column shows its frame."""
    frames = [FrameGeometry(f"1.{i}", None, (0.0, 0.0, z), (1, 0, 0, 0, 1, 0), (1.0, 1.0), 1, 1) for i, z in enumerate(zs)]
    return np.arange(1, len(zs) + 1, dtype=np.int16).reshape(-1, 1, 1), frames


def test_frames_to_grid_nearest_frame_and_its_reach_along_the_normal() -> None:
    column = np.diag([-1.0, -1.0, 1.0, 1.0])
    column[2, 3] = -3.0  # voxel k of the (1, 1, 15) grid lies at z = k - 3 mm
    pix, frames = _column_stack([0.0, 4.0, 8.0])
    # z = -3 ... 11: each frame reaches 2 mm (half the 4 mm gap) either side, ties go to the later frame
    got = frames_to_grid(pix, frames, column, (1, 1, 15), fill=-1)[0, 0].tolist()
    assert got == [-1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, -1]
    got = frames_to_grid(pix[:2], frames[:2], column, (1, 1, 15), fill=-1)[0, 0].tolist()  # two frames
    assert got == [-1, 1, 1, 1, 1, 2, 2, 2, 2, 2, -1, -1, -1, -1, -1]
    # one frame: half a millimetre either side, and fill defaults to 0
    pix, frames = _column_stack([0.0])
    assert frames_to_grid(pix, frames, column, (1, 1, 6))[0, 0].tolist() == [0, 0, 0, 1, 0, 0]


def test_sample_frames_output_dtype_default_fill_and_frames_outside() -> None:
    data = np.zeros((3, 3, 2), np.uint8)
    data[1:, :, :] = 2
    lps_grid = np.diag([-1.0, -1.0, 1.0, 1.0])
    inside = FrameGeometry("1.1", None, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (1.0, 0.5), 1, 3)  # x = 0, 0.5, 1
    outside = FrameGeometry("1.2", None, (0.0, 0.0, 9.0), (1, 0, 0, 0, 1, 0), (1.0, 0.5), 1, 3)
    near = sample_frames(data, lps_grid, [outside, inside])  # a frame wholly outside does not end the loop
    assert near.dtype == np.uint8 and near[0].tolist() == [[0, 0, 0]] and near[1].tolist() == [[0, 2, 2]]
    lin = sample_frames(data, lps_grid, [inside], interpolation="linear")
    assert lin.dtype == np.float32 and lin[0].tolist() == [[0.0, 1.0, 2.0]]  # probabilities: float32, never uint8
    with pytest.raises(DicomError, match=r"^expected a 3D volume \(plus optional trailing axes\), got shape \(3, 3\)$"):
        sample_frames(data[:, :, 0], lps_grid, [inside])
