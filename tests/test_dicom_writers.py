"""DICOM outputs: SEG, SR TID 1500, Parametric Map and Secondary Capture.

Every object is checked by reading it back (pydicom / highdicom) and comparing in world space, with
``dciodvfy`` (no errors), and for byte-for-byte reproducibility. Synthetic series come from
:mod:`tests.dicom_factory` through ``medpipe.ingest`` (:mod:`tests.ingested`), as a scoring run
would see them; the real JPEG 2000 CT and the enhanced MR come from ``../shared/data``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medpipe.data.volumes import read_grid, read_seg, seg_to_labelmap
from medpipe.dicom.frames import derived_frame_sources, frame_geometries, instance_uid, sample_frames, volume_to_frames
from medpipe.dicom.output import AlgorithmSpec, OutputIdentity, as_code, code_dict
from medpipe.dicom.pmap import read_parametric_map, write_parametric_map
from medpipe.dicom.sc import CIVIDIS, OUTLINE, render_overlay, write_overlay_sc
from medpipe.dicom.seg import SegmentSpec, read_seg_frames, seg_to_source_frames, write_seg
from medpipe.dicom.sr import ClassResult, NumericMeasurement, write_classification_sr, write_seg_sr
from medpipe.dicom.uids import derive_uid
from medpipe.errors import DicomError
from medpipe.ingest import ingest
from tests.dicom_checks import dciodvfy_errors, dciodvfy_warnings, needs_dciodvfy, sr_content_items
from tests.dicom_factory import Geometry, ct_gantry_tilt, oblique_iop
from tests.ingested import LPS, Ingested, axial_series, ingest_series, pixel_lps, two_blocks, values_at

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
ALGORITHM = AlgorithmSpec("test-unet", "1.2", parameters={"checkpoint": "0123abcd"})
TISSUE = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}
SPECS = [
    SegmentSpec("Liver", TISSUE, {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
                anatomic_region=codes.SCT.Abdomen),
    SegmentSpec("Spleen", TISSUE, codes.SCT.Spleen, color=(0, 158, 115)),
]


def identity(*key: object, number: int = 900) -> OutputIdentity:
    return OutputIdentity.derived("tests.dicom_writers", *key, series_number=number, created=CREATED)


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    return axial_series(tmp_path_factory.mktemp("axial"))


# -- SEG ------------------------------------------------------------------------------------------------


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["BINARY", "LABELMAP"])
def test_seg_round_trip_axial(axial: Ingested, tmp_path: Path, kind: str) -> None:
    labels = two_blocks(axial.volume.shape)
    frames = frame_geometries(axial.sources)
    masks = sample_frames(labels, axial.affine, frames)
    target = tmp_path / "seg.dcm"
    written = write_seg(target, axial.sources, masks, SPECS, ALGORITHM, identity("seg", kind), segmentation_type=kind)
    assert dciodvfy_errors(target) == []
    assert dciodvfy_warnings(target) == []
    ds = pydicom.dcmread(target)
    src = axial.sources[0]
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.PatientID == src.PatientID and ds.SOPInstanceUID == written.SOPInstanceUID
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.66.7" if kind == "LABELMAP" else "1.2.840.10008.5.1.4.1.1.66.4")
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == {instance_uid(d) for d in axial.sources}
    described = [s for s in ds.SegmentSequence if s.SegmentNumber > 0]
    assert [s.SegmentLabel for s in described] == ["Liver", "Spleen"]
    assert described[0].AnatomicRegionSequence[0].CodeValue == codes.SCT.Abdomen.value
    assert described[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Spleen.value
    algo = described[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("test-unet", "1.2")

    # highdicom reads it back onto the source instances: the masks that were written
    seg = hd.seg.segread(target)
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[instance_uid(d) for d in axial.sources], segment_numbers=[1, 2],
        combine_segments=True, assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(back, masks)
    assert np.array_equal(seg_to_source_frames(ds, frames).argmax(-1) + seg_to_source_frames(ds, frames).any(-1), masks)
    # and in world space: every SEG pixel, placed by the SEG's own plane positions, holds the label
    # that the volume (ingest's grid and affine) has there
    for lps, f in zip(pixel_lps(ds), read_seg_frames(ds)):
        at = values_at(labels, axial.affine, lps)
        expect = (at == f.segment_number) if f.segment_number else at
        assert np.array_equal(f.pixels, expect.astype(f.pixels.dtype))
    # frames left out are exactly the empty ones
    present = {(f.source_sop_instance_uid, f.segment_number) for f in read_seg_frames(ds)}
    for k, d in enumerate(axial.sources):
        for n in (1, 2):
            if kind == "BINARY":
                assert ((instance_uid(d), n) in present) == bool((masks[k] == n).any())
    # highdicom's own volume, in world space
    vol = seg.get_volume(combine_segments=True)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    idx = np.indices(vol.array.shape).reshape(3, -1)
    pts = (ras[:3, :3] @ idx + ras[:3, 3:4]).T @ LPS.T
    assert np.array_equal(vol.array.reshape(-1), values_at(labels, axial.affine, pts))
    # and the label-map reader of the dataset stage puts it back on ingest's volume
    lm = seg_to_labelmap(read_seg(str(target)), read_grid(axial.volume_path), axial.sidecar)
    assert lm.method == "source instances" and np.array_equal(lm.data, labels)


def test_seg_is_reproducible_and_ignores_pixels(axial: Ingested, tmp_path: Path) -> None:
    masks = sample_frames(two_blocks(axial.volume.shape), axial.affine, frame_geometries(axial.sources))
    full = {instance_uid(d): d for d in (pydicom.dcmread(p) for p in axial.files)}
    with_pixels = [full[instance_uid(d)] for d in axial.sources]
    a = write_seg(tmp_path / "a.dcm", axial.sources, masks, SPECS, ALGORITHM, identity("seg"))
    write_seg(tmp_path / "b.dcm", with_pixels, masks, SPECS, ALGORITHM, identity("seg"))
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    assert a.SOPInstanceUID == identity("seg").sop_instance_uid
    assert int(a.SeriesNumber) == 900 and str(a.ContentDate) == "20240506" and str(a.ContentTime) == "070809"
    assert [t for t in (tmp_path).iterdir() if t.name.startswith(".")] == []  # no temporary files left
    other = write_seg(tmp_path / "c.dcm", axial.sources, masks, SPECS, ALGORITHM, identity("other"))
    assert other.SOPInstanceUID != a.SOPInstanceUID and other.SeriesInstanceUID != a.SeriesInstanceUID


@needs_dciodvfy
def test_empty_seg_is_valid(axial: Ingested, tmp_path: Path) -> None:
    masks = np.zeros((8, 12, 16), np.uint8)
    seg = write_seg(tmp_path / "empty.dcm", axial.sources, masks, SPECS, ALGORITHM, identity("empty"))
    assert dciodvfy_errors(tmp_path / "empty.dcm") == []
    assert seg.NumberOfFrames == 16  # all frames kept: two empty segments on 8 frames
    assert not seg_to_source_frames(tmp_path / "empty.dcm", frame_geometries(axial.sources)).any()


def test_seg_input_errors_are_one_line(axial: Ingested, tmp_path: Path) -> None:
    ok = np.zeros((8, 12, 16), np.uint8)
    cases = [
        ({"masks": np.zeros((8, 16, 12), np.uint8)}, "do not fit 8 source frames of 12x16"),
        ({"masks": ok + 3}, "value 3 but only 2 segment specs"),
        ({"masks": np.zeros((8, 12, 16, 3), np.uint8)}, "3 segments but 2"),
        ({"masks": ok.astype(float) + 0.5}, "not fractions"),
        ({"segments": [{"label": "x", "category": {"scheme": "SCT", "value": "1"}, "type": TISSUE}]}, "missing meaning"),
        ({"segments": [{"label": "x", "category": TISSUE}]}, "missing type"),
        ({"segmentation_type": "FRACTIONAL"}, "BINARY or LABELMAP"),
    ]
    for change, message in cases:
        kw: dict[str, Any] = {"masks": ok, "segments": SPECS, **change}
        options = {"segmentation_type": kw.pop("segmentation_type")} if "segmentation_type" in kw else {}
        with pytest.raises(DicomError, match=message) as info:
            write_seg(tmp_path / "x.dcm", axial.sources, kw["masks"], kw["segments"], ALGORITHM, identity("x"), **options)
        assert "\n" not in str(info.value)
    overlap = np.zeros((8, 12, 16, 2), np.uint8)
    overlap[2, 3, 4] = 1
    with pytest.raises(DicomError, match="overlapping"):
        write_seg(tmp_path / "x.dcm", axial.sources, overlap, SPECS, ALGORITHM, identity("x"), segmentation_type="LABELMAP")
    other = copy.deepcopy(axial.sources[1])
    other.SeriesInstanceUID = derive_uid("another series")
    with pytest.raises(DicomError, match="differ in SeriesInstanceUID"):
        write_seg(tmp_path / "x.dcm", [axial.sources[0], other, *axial.sources[2:]], ok, SPECS, ALGORITHM, identity("x"))
    assert not (tmp_path / "x.dcm").exists()


def test_codes_from_json() -> None:
    code = as_code({"scheme": "SCT", "value": "10200004", "meaning": "Liver"})
    assert code == codes.SCT.Liver and as_code(code_dict(code)) == code
    assert as_code(hd.sr.CodedConcept("10200004", "SCT", "Liver")) == code
    with pytest.raises(DicomError, match="unknown keys"):
        as_code({"scheme": "SCT", "value": "1", "meaning": "x", "colour": "red"})
    spec = SegmentSpec.from_dict({"label": "Liver", "category": TISSUE, "type": code_dict(code), "color": [1, 2, 3]})
    assert spec.color == (1, 2, 3)


#: name -> geometry of series that ingest resamples (tilted / sheared, oblique, uneven)
RESAMPLED = {
    "ct-gantry-+15deg": lambda: (ct_gantry_tilt(15.0, 2.0, origin=(-12.0, -10.0, 5.0), pixel_spacing=(1.0, 1.0)), {}),
    "ct-gantry--22deg": lambda: (ct_gantry_tilt(-22.0, 2.0, origin=(-12.0, -10.0, 5.0), pixel_spacing=(1.0, 1.0)), {}),
    "oblique-sheared": lambda: (Geometry(iop=oblique_iop(20, -15), origin=(-12.0, -10.0, 5.0), pixel_spacing=(0.8, 1.1),
                                         slice_spacing=2.0, shift=(0.35, -0.5)), {}),
    "missing-slices": lambda: (Geometry(iop=oblique_iop(0, 10), origin=(-12.0, -10.0, 5.0), slice_spacing=2.0),
                               {"drop": (4, 5)}),
}


@needs_dciodvfy
@pytest.mark.parametrize("name", list(RESAMPLED))
def test_seg_on_resampled_series_lands_in_world_space(tmp_path: Path, name: str) -> None:
    """A label made on ingest's resampled grid goes back onto the tilted / uneven source frames in place."""
    geo, kw = RESAMPLED[name]()
    s = ingest_series(tmp_path, geo, (24, 24, 10), **kw)
    assert s.sidecar["Resampled"] is True
    centre = geo.world((24, 24, 10))[11, 12, 5] + np.array([0.3, -0.2, 0.4])  # LPS, off every grid
    radius = 6.0

    def ball(lps: np.ndarray) -> np.ndarray:
        return (np.linalg.norm(lps - centre, axis=-1) <= radius).astype(np.uint8)

    idx = np.indices(s.volume.shape).reshape(3, -1)
    ras = s.affine[:3, :3] @ idx + s.affine[:3, 3:4]
    label = ball((ras.T @ LPS.T).reshape(*s.volume.shape, 3))  # the "prediction" on ingest's grid
    assert label.sum() > 100
    sources = sorted(s.sources, key=lambda d: str(d.SOPInstanceUID))  # any order works
    frames = frame_geometries(sources)
    masks = sample_frames(label, s.affine, frames)
    target = tmp_path / "seg.dcm"
    write_seg(target, sources, masks, SPECS[:1], ALGORITHM, identity("tilt", name))
    assert dciodvfy_errors(target) == []
    ds = pydicom.dcmread(target)
    seg = hd.seg.segread(target)
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[instance_uid(d) for d in sources], segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(back[..., 0], masks)
    # world space: each SEG pixel (placed by the SEG's own header) is inside the ball iff it is set,
    # except within the half voxel diagonal of ingest's grid around the surface (nearest neighbour)
    band = 0.5 * float(np.linalg.norm(np.sqrt((s.affine[:3, :3] ** 2).sum(axis=0))))
    checked = 0
    for lps, f in zip(pixel_lps(ds), read_seg_frames(ds)):
        distance = np.linalg.norm(lps - centre, axis=-1)
        sure = np.abs(distance - radius) > band
        assert np.array_equal(f.pixels[sure] > 0, distance[sure] <= radius)
        checked += int((f.pixels[sure] > 0).sum())
        # and the SEG frame lies on its source frame
        src = frames[[g.sop_instance_uid for g in frames].index(f.source_sop_instance_uid)]
        assert np.allclose(f.geometry.position, src.position, atol=1e-4)
    assert checked > 50


@needs_dciodvfy
def test_seg_on_enhanced_multiframe_source(shared_data: Path, tmp_path: Path) -> None:
    """One multi-frame source (per-frame orientation and spacing, which highdicom wants shared)."""
    path = shared_data / "dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_2.dcm"
    report = ingest(path, tmp_path / "out", workers=1)
    (row,) = report.volumes
    img = nib.load(tmp_path / "out" / row["volume"])
    vol = np.asarray(img.dataobj)
    label = (vol > np.percentile(vol, 70)).astype(np.uint8)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = frame_geometries([ds])
    masks = sample_frames(label, img.affine, frames)
    side = json.loads((tmp_path / "out" / row["sidecar"]).read_text())
    assert np.array_equal(masks[np.asarray(side["SourceFrameNumbers"]) - 1], volume_to_frames(label))
    with pytest.warns(UserWarning, match="person name"):  # highdicom on the source's one-component names
        write_seg(tmp_path / "seg.dcm", [ds], masks, SPECS[:1], ALGORITHM, identity("xa10"))
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert np.array_equal(seg_to_source_frames(tmp_path / "seg.dcm", frames)[..., 0], masks > 0)
    assert "PerFrameFunctionalGroupsSequence" in ds and "PixelMeasuresSequence" not in ds.SharedFunctionalGroupsSequence[0]


def test_seg_refuses_several_frames_at_one_position(shared_data: Path) -> None:
    """The Philips field map has a magnitude and a phase frame at each position: one object per stack."""
    ds = pydicom.dcmread(shared_data / "dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm", stop_before_pixels=True)
    with pytest.raises(DicomError, match="lie at the same position"):
        write_seg(Path("/nonexistent/seg.dcm"), [ds], np.zeros((64, 64, 64), np.uint8), SPECS[:1], ALGORITHM,
                  identity("philips"))


@pytest.fixture(scope="module")
def totalseg(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real JPEG 2000 CT (UIDs blanked by de-identification) and its TotalSegmentator label map."""
    tmp = tmp_path_factory.mktemp("totalseg")
    ct = shared_data / "totalseg_ct" / "example_ct_dicom"
    report = ingest(ct, tmp / "out", workers=1)
    (row,) = [v for v in report.volumes if v["modality"] == "CT"]
    side = json.loads((tmp / "out" / row["sidecar"]).read_text())
    headers = {instance_uid(d): d for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct.iterdir()))}
    label = nib.load(shared_data / "totalseg_ct" / "example_seg_dicom.nii.gz")
    return {"tmp": tmp, "sources": [headers[u] for u in side["SourceSOPInstanceUIDs"]], "sidecar": side,
            "volume": tmp / "out" / row["volume"], "labels": np.asarray(label.dataobj), "affine": label.affine}


#: TotalSegmentator classes used as segments: (label value, name, SNOMED CT type)
TOTALSEG = [(5, "Liver", codes.SCT.Liver), (1, "Spleen", codes.SCT.Spleen), (52, "Aorta", codes.SCT.Aorta)]


@needs_dciodvfy
def test_seg_of_real_jpeg2000_ct_lands_voxel_for_voxel(totalseg: dict[str, Any]) -> None:
    labels = totalseg["labels"]
    prediction = np.zeros(labels.shape, np.uint8)
    for n, (value, _, _) in enumerate(TOTALSEG, 1):
        prediction[labels == value] = n
    assert all((prediction == n).sum() > 1000 for n in (1, 2, 3))
    frames = frame_geometries(totalseg["sources"])
    masks = sample_frames(prediction, totalseg["affine"], frames)
    assert np.array_equal(masks, volume_to_frames(prediction))  # the label map's grid is the series' own
    specs = [SegmentSpec(name, TISSUE if name != "Aorta" else codes.SCT.AnatomicalStructure, code)
             for _, name, code in TOTALSEG]
    target = totalseg["tmp"] / "seg.dcm"
    seg = write_seg(target, totalseg["sources"], masks, specs, ALGORITHM, identity("totalseg"))
    totalseg["seg"] = seg
    assert dciodvfy_errors(target) == []
    # warnings: both come with the source (a private coding scheme in its Procedure Code Sequence and
    # a Body Part Examined outside the defined terms), not from the writer
    assert all("SECTRA" in w or "PARTIALBODY" in w for w in dciodvfy_warnings(target)), dciodvfy_warnings(target)
    # substitute UIDs for the blanked study / series, the same in every output
    assert seg.StudyInstanceUID.startswith("2.25.") and seg.ReferencedSeriesSequence[0].SeriesInstanceUID.startswith("2.25.")
    lm = seg_to_labelmap(read_seg(str(target)), read_grid(totalseg["volume"]), totalseg["sidecar"])
    assert lm.method == "source instances" and np.array_equal(lm.data, prediction)
    assert lm.names == {1: "liver", 2: "spleen", 3: "aorta"}


# -- SR -------------------------------------------------------------------------------------------------


@needs_dciodvfy
def test_seg_sr_volumes_and_references(axial: Ingested, tmp_path: Path) -> None:
    labels = two_blocks(axial.volume.shape)
    masks = sample_frames(labels, axial.affine, frame_geometries(axial.sources))
    seg = write_seg(tmp_path / "seg.dcm", axial.sources, masks, SPECS, ALGORITHM, identity("seg"))
    mean_hu = NumericMeasurement(codes.SCT.Mean, 42.5, {"scheme": "UCUM", "value": "[hnsf'U]", "meaning": "Hounsfield unit"})
    target = tmp_path / "sr.dcm"
    write_seg_sr(target, seg, axial.sources, ALGORITHM, identity("sr"), measurements={1: [mean_hu]})
    assert dciodvfy_errors(target) == []
    assert dciodvfy_warnings(target) == []
    voxel_ml = abs(np.linalg.det(axial.truth_affine[:3, :3])) / 1000.0  # independent of medpipe
    expected = {n: float((labels == n).sum()) * voxel_ml for n in (1, 2)}
    sr = hd.sr.srread(target)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    tracking = {int(s.SegmentNumber): s.TrackingUID for s in seg.SegmentSequence}
    for group in groups:
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        n = int(ref.ReferencedSegmentNumber)
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and ref.ReferencedSOPClassUID == seg.SOPClassUID
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert volume.value == pytest.approx(expected[n], rel=1e-9) and volume.unit.value == "ml"
        assert group.tracking_uid == tracking[n]
        assert group.finding_type.value == (codes.SCT.Liver if n == 1 else codes.SCT.Spleen).value
        if n == 1:
            assert group.get_measurements(name=codes.SCT.Mean)[0].value == pytest.approx(42.5)
            assert group.finding_sites[0].value == codes.SCT.Abdomen
        series_items = [i for i in sr_content_items(group[0]) if i.ValueType == "UIDREF" and i.ConceptNameCodeSequence[0].CodeValue == "121232"]
        assert [i.UID for i in series_items] == [axial.sources[0].SeriesInstanceUID]  # Source Series For Segmentation
        algorithm_names = [i.TextValue for i in sr_content_items(group[0]) if i.get("ValueType") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111001"]
        assert algorithm_names == ["test-unet"]
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID} | {instance_uid(d) for d in axial.sources}
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.Modality == "SR"
    again = tmp_path / "again.dcm"
    write_seg_sr(again, pydicom.dcmread(tmp_path / "seg.dcm"), axial.sources, ALGORITHM, identity("sr"),
                 measurements={1: [mean_hu]})
    assert again.read_bytes() == target.read_bytes()


@needs_dciodvfy
def test_seg_sr_of_labelmap_seg_only_trips_dciodvfys_segmentation_check(axial: Ingested, tmp_path: Path) -> None:
    """dciodvfy (2026-09) treats only Segmentation Storage as "segmentation" when checking Referenced
    Segment Number; highdicom and the standard also accept Label Map Segmentation Storage."""
    masks = sample_frames(two_blocks(axial.volume.shape), axial.affine, frame_geometries(axial.sources))
    seg = write_seg(tmp_path / "seg.dcm", axial.sources, masks, SPECS, ALGORITHM, identity("lm"), segmentation_type="LABELMAP")
    write_seg_sr(tmp_path / "sr.dcm", seg, axial.sources, ALGORITHM, identity("lm-sr"))
    errors = dciodvfy_errors(tmp_path / "sr.dcm")
    assert errors and all("Referenced SOP Class that is not segmentation" in e for e in errors), errors


def test_sr_volumes_of_a_tilted_series(tmp_path: Path) -> None:
    """Volumes measured on the tilted source frames agree with the count on ingest's orthogonal grid."""
    geo = ct_gantry_tilt(15.0, 2.0, origin=(-12.0, -10.0, 5.0), pixel_spacing=(1.0, 1.0))
    s = ingest_series(tmp_path, geo, (24, 24, 10))
    label = np.zeros(s.volume.shape, np.uint8)
    label[5:19, 6:18, 2:8] = 1
    masks = sample_frames(label, s.affine, frame_geometries(s.sources))
    seg = write_seg(tmp_path / "seg.dcm", s.sources, masks, SPECS[:1], ALGORITHM, identity("tilt-sr"))
    sr = write_seg_sr(tmp_path / "sr.dcm", seg, s.sources, ALGORITHM, identity("tilt-sr-sr"))
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
    on_grid = label.sum() * abs(np.linalg.det(s.affine[:3, :3])) / 1000.0
    assert group.get_measurements(name=codes.SCT.Volume)[0].value == pytest.approx(on_grid, rel=0.05)


@needs_dciodvfy
def test_classification_sr(axial: Ingested, tmp_path: Path) -> None:
    results = [
        ClassResult({"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}, 0.83, 0.5, label="tumour"),
        ClassResult(codes.SCT.Malignant, 0.2, 0.35),
    ]
    target = tmp_path / "cls.dcm"
    write_classification_sr(target, axial.sources, results, ALGORITHM, identity("cls"))
    assert dciodvfy_errors(target) == []
    assert dciodvfy_warnings(target) == []
    sr = hd.sr.srread(target)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group, r in zip(groups, results):
        finding = as_code(r.finding)
        assert group.finding_type.value == finding.value
        (prob,) = group.get_measurements()
        assert prob.value == pytest.approx(r.probability) and prob.name.value == "122157" and prob.unit.value == "1"
        (decision,) = group.get_qualitative_evaluations(name=finding)
        assert decision.name.value == finding.value
        assert decision.value.value == ("52101004" if r.probability >= r.threshold else "272519000")
        params = [i.TextValue for i in sr_content_items(group[0]) if i.get("ValueType") == "TEXT"
                  and i.ConceptNameCodeSequence[0].CodeValue == "111002"]
        assert f"threshold={r.threshold:g}" in params and "checkpoint=0123abcd" in params
    library = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in sr_content_items(sr)
               if i.get("ValueType") == "IMAGE"]
    assert set(library) == {instance_uid(d) for d in axial.sources}
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == set(library)
    write_classification_sr(tmp_path / "again.dcm", axial.sources, results, ALGORITHM, identity("cls"))
    assert (tmp_path / "again.dcm").read_bytes() == target.read_bytes()
    with pytest.raises(DicomError, match=r"\[0, 1\]"):
        write_classification_sr(tmp_path / "x.dcm", axial.sources, [ClassResult(codes.SCT.Malignant, 1.2, 0.5)],
                                ALGORITHM, identity("x"))


# -- parametric map and secondary capture -----------------------------------------------------------------


@needs_dciodvfy
@pytest.mark.parametrize("encoding", ["float32", "uint16"])
def test_parametric_map(axial: Ingested, tmp_path: Path, encoding: str) -> None:
    saliency = np.clip(axial.volume / axial.volume.max(), 0, 1).astype(np.float32)
    frames = frame_geometries(axial.sources)
    values = sample_frames(saliency, axial.affine, frames, interpolation="linear")
    target = tmp_path / "pm.dcm"
    pm = write_parametric_map(target, axial.sources, values, ALGORITHM, identity("pm", encoding), encoding=encoding)
    assert dciodvfy_errors(target) == []
    assert dciodvfy_warnings(target) == []
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.FrameOfReferenceUID == axial.sources[0].FrameOfReferenceUID
    back = read_parametric_map(target, frames)
    step = 0.0 if encoding == "float32" else 0.5 / 65535
    assert np.abs(back - values).max() <= step + 1e-12
    # the stored map, placed by its own plane positions, is the saliency in world space
    ds = pydicom.dcmread(target)
    for lps, (uid, _) in zip(pixel_lps(ds), derived_frame_sources(ds)):
        k = [f.sop_instance_uid for f in frames].index(uid)
        assert np.abs(values_at(saliency, axial.affine, lps) - back[k]).max() <= step + 1e-6
    write_parametric_map(tmp_path / "again.dcm", axial.sources, values, ALGORITHM, identity("pm", encoding), encoding=encoding)
    assert (tmp_path / "again.dcm").read_bytes() == target.read_bytes()


@needs_dciodvfy
def test_objects_of_a_source_without_body_part(tmp_path: Path) -> None:
    """No Body Part Examined: Laterality is written empty ("unknown") where dciodvfy needs it."""
    s = ingest_series(tmp_path, Geometry(), (16, 12, 8), extra={})
    values = np.zeros((8, 12, 16), np.float32)
    write_parametric_map(tmp_path / "pm.dcm", s.sources, values, ALGORITHM, identity("nobody"))
    full = pydicom.dcmread(s.files[0])
    write_overlay_sc(tmp_path / "sc.dcm", full, identity("nobody-sc"), overlay=values[0])
    for name in ("pm.dcm", "sc.dcm"):
        assert dciodvfy_errors(tmp_path / name) == []
        (warning,) = dciodvfy_warnings(tmp_path / name)
        assert "Laterality" in warning and "empty when actually unknown" in warning


@needs_dciodvfy
def test_overlay_secondary_capture(axial: Ingested, tmp_path: Path) -> None:
    frames = frame_geometries(axial.sources)
    k = 4
    saliency = sample_frames(np.clip(axial.volume / axial.volume.max(), 0, 1), axial.affine, frames,
                             interpolation="linear")[k]
    saliency[:, :5] = 0.0
    mask = sample_frames(two_blocks(axial.volume.shape), axial.affine, frames)[k] == 1
    source = next(d for d in (pydicom.dcmread(p) for p in axial.files) if instance_uid(d) == instance_uid(axial.sources[k]))
    target = tmp_path / "sc.dcm"
    write_overlay_sc(target, source, identity("sc", k), overlay=saliency, outline=mask, window=(2000, 4000))
    assert dciodvfy_errors(target) == []
    assert dciodvfy_warnings(target) == []
    ds = pydicom.dcmread(target)
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (12, 16, 3, "RGB")
    assert list(ds.PatientOrientation) == ["L", "P"]
    rgb = ds.pixel_array
    expected = render_overlay(source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept),
                              (2000, 4000), saliency, mask)
    assert np.array_equal(rgb, expected)
    edge = mask & ~np.pad(mask, 1)[2:, 1:-1]  # pixels of the mask whose lower neighbour is outside
    assert edge.any() and np.all(rgb[edge] == OUTLINE)
    plain = (saliency == 0) & ~mask
    assert np.all(rgb[plain][:, 0] == rgb[plain][:, 1]) and np.all(rgb[plain][:, 1] == rgb[plain][:, 2])  # grey
    write_overlay_sc(tmp_path / "again.dcm", source, identity("sc", k), overlay=saliency, outline=mask, window=(2000, 4000))
    assert (tmp_path / "again.dcm").read_bytes() == target.read_bytes()
    with pytest.raises(DicomError, match="without pixel data"):
        write_overlay_sc(tmp_path / "x.dcm", axial.sources[k], identity("x"), overlay=saliency)


def test_cividis_table_matches_matplotlib() -> None:
    import matplotlib

    from medpipe.dicom.sc import cividis

    x = np.linspace(0, 1, 257)
    assert np.abs(cividis(x) - matplotlib.colormaps["cividis"](x)[:, :3] * 255).max() < 6  # of 255
    assert CIVIDIS.shape == (33, 3)
