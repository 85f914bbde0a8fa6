"""DICOM SR details checked by hand: slab thicknesses and volumes, and point findings read back with pydicom.

Written to kill the surviving mutants of ``medpipe/dicom/sr.py`` (see benchmarks/mutation.py): each
expected number is derived in the comment next to it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medpipe.dicom.frames import FrameGeometry
from medpipe.dicom.output import AlgorithmSpec, OutputIdentity
from medpipe.dicom.sr import (
    ClassResult,
    PointFinding,
    read_findings_sr,
    segment_volumes_ml,
    slab_thicknesses,
    write_classification_sr,
    write_findings_sr,
)
from medpipe.errors import DicomError
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy, sr_content_items, sr_groups
from tests.ingested import Ingested, axial_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ALGORITHM = AlgorithmSpec("test-detector", "0.1")
CREATED = dt.datetime(2024, 1, 2, 3, 4, 5)


def _frame(z: float, spacing: tuple[float, float] = (0.5, 2.0), iop: tuple[float, ...] = AXIAL) -> FrameGeometry:
    return FrameGeometry(f"1.2.3.{int(z * 10)}", None, (0.0, 0.0, z), iop, spacing, 4, 4)  # type: ignore[arg-type]


def test_slab_thicknesses_of_an_uneven_unsorted_stack() -> None:
    # z = 3, 0, 7, 2 -> sorted 0, 2, 3, 7, gaps 2, 1, 4; each frame: half its two neighbour gaps, the ends
    # repeat their one gap: z0 (2+2)/2 = 2, z2 (2+1)/2 = 1.5, z3 (1+4)/2 = 2.5, z7 (4+4)/2 = 4
    widths = slab_thicknesses([_frame(3), _frame(0), _frame(7), _frame(2)])
    np.testing.assert_allclose(widths, [2.5, 2.0, 4.0, 1.5])


def test_slab_thicknesses_refuse_what_has_no_spacing() -> None:
    with pytest.raises(DicomError, match=r"^source frames have different orientations: cannot measure volumes "
                                         r"from them$"):
        slab_thicknesses([_frame(0), _frame(1, iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))])
    with pytest.raises(DicomError, match=r"^a single source frame has no slice spacing: pass volumes_ml$"):
        slab_thicknesses([_frame(0)])
    with pytest.raises(DicomError, match=r"^several source frames lie at one position \(echoes or time points\?\): "
                                         r"pass volumes_ml$"):
        slab_thicknesses([_frame(0), _frame(1), _frame(1.0005)])
    # the tolerances are exclusive: orientations 1e-4 apart are one orientation, frames 1e-3 mm apart two
    np.testing.assert_allclose(slab_thicknesses([_frame(0), _frame(1, iop=(1.0, 0.0, 0.0, 0.0, 1.0, 1e-4))]),
                               [1.0, 1.0])
    np.testing.assert_allclose(slab_thicknesses([_frame(0), _frame(0.001)]), [0.001, 0.001])


def test_segment_volumes_weigh_pixel_area_and_slab() -> None:
    frames = [_frame(0), _frame(2), _frame(3)]  # slabs 2, 1.5, 1 mm; pixels 0.5 x 2 = 1 mm^2
    frames[2] = _frame(3, spacing=(1.0, 3.0))  # but 3 mm^2 on the last frame
    masks = np.zeros((3, 4, 4, 2), dtype=np.uint8)
    masks[0, :2, :, 0] = 1  # 8 px * 1 mm^2 * 2 mm = 16 mm^3
    masks[2, 0, 0, 0] = 7  # any non-zero counts: 1 px * 3 mm^2 * 1 mm = 3 mm^3
    masks[1, :, :, 1] = 1  # 16 px * 1 mm^2 * 1.5 mm = 24 mm^3
    np.testing.assert_allclose(segment_volumes_ml(masks, frames), [0.019, 0.024])
    with pytest.raises(DicomError, match="for 3 frames"):
        segment_volumes_ml(masks[:2], frames)
    with pytest.raises(DicomError, match="for 3 frames"):
        segment_volumes_ml(masks[..., 0], frames)


# -- point findings ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    return axial_series(tmp_path_factory.mktemp("axial"))


def _identity(key: str) -> OutputIdentity:
    return OutputIdentity.derived("tests.dicom_sr", key, series_number=950, created=CREATED)


def test_findings_sr_points_units_and_codes_read_back(axial: Ingested, tmp_path: Path) -> None:
    findings = [
        PointFinding((-12.5, 30.25, -101.0), diameter_mm=6.5, score=0.875, label="Nodule A"),
        PointFinding((1.0, 2.0, 3.0), finding={"scheme": "SCT", "value": "4147007", "meaning": "Mass"},
                     finding_site=None, tracking_uid="1.2.826.0.1.3680043.8.498.1"),
    ]
    target = tmp_path / "sr.dcm"
    write_findings_sr(target, axial.sources, findings, ALGORITHM, _identity("two"))
    ds = pydicom.dcmread(target)
    items = sr_content_items(ds)
    # by hand, with pydicom: the SCOORD3D points, their frame of reference, the coded units
    points = sorted([list(map(float, i.GraphicData)) for i in items if i.ValueType == "SCOORD3D"])
    assert points == [[-12.5, 30.25, -101.0], [1.0, 2.0, 3.0]]
    assert {i.GraphicType for i in items if i.ValueType == "SCOORD3D"} == {"POINT"}
    assert {i.ReferencedFrameOfReferenceUID for i in items if i.ValueType == "SCOORD3D"} == {
        str(axial.sources[0].FrameOfReferenceUID)}
    nums = {(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodingSchemeDesignator):
            (float(i.MeasuredValueSequence[0].NumericValue),
             i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
             i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodingSchemeDesignator)
            for i in items if i.ValueType == "NUM"}
    assert nums == {("81827009", "SCT"): (6.5, "mm", "UCUM"), ("122157", "DCM"): (0.875, "1", "UCUM")}
    finding_types = sorted(i.ConceptCodeSequence[0].CodeValue for i in items
                           if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071")
    assert finding_types == ["27925004", "4147007"]  # Nodule (default), Mass
    sites = [i.ConceptCodeSequence[0].CodeValue for i in items
             if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "363698007"]
    assert sites == ["39607008"]  # Lung for the first only

    report = read_findings_sr(target)
    assert report.frame_of_reference_uid == str(axial.sources[0].FrameOfReferenceUID)
    assert report.referenced_series == [str(axial.sources[0].SeriesInstanceUID)]
    by_label = {f.label: f for f in report.findings}
    assert set(by_label) == {"Nodule A", "Finding 2"}
    a, b = by_label["Nodule A"], by_label["Finding 2"]
    assert (a.center, a.diameter_mm, a.score) == ((-12.5, 30.25, -101.0), 6.5, 0.875)
    assert (a.finding.value, a.finding.scheme_designator) == ("27925004", "SCT")
    assert a.finding_site is not None and a.finding_site.value == "39607008"
    assert (b.center, b.diameter_mm, b.score, b.finding_site) == ((1.0, 2.0, 3.0), None, None, None)
    assert (b.finding.value, b.finding.meaning) == ("4147007", "Mass")
    assert b.tracking_uid == "1.2.826.0.1.3680043.8.498.1"
    assert a.tracking_uid is not None and a.tracking_uid != b.tracking_uid
    # a dataset reads the same as its file, and is left as it was (highdicom converts in place unless asked not to)
    assert read_findings_sr(ds).findings == report.findings
    assert type(ds) is pydicom.FileDataset and type(ds.ContentSequence[0]) is pydicom.Dataset


def test_findings_sr_diameter_in_cm_is_read_in_mm(axial: Ingested, tmp_path: Path) -> None:
    target = tmp_path / "sr.dcm"
    write_findings_sr(target, axial.sources, [PointFinding((0.0, 0.0, 0.0), diameter_mm=1.25)], ALGORITHM,
                      _identity("cm"))
    ds = pydicom.dcmread(target)
    (num,) = [i for i in sr_content_items(ds) if i.ValueType == "NUM"]
    unit = num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    unit.CodeValue, unit.CodeMeaning = "cm", "centimeter"
    (finding,) = read_findings_sr(ds).findings
    assert finding.diameter_mm == pytest.approx(12.5)
    # another SCT concept (Volume) is not a diameter: both the code and its scheme must match
    num.ConceptNameCodeSequence[0].CodeValue = "118565006"
    num.ConceptNameCodeSequence[0].CodeMeaning = "Volume"
    (finding,) = read_findings_sr(ds).findings
    assert finding.diameter_mm is None


def test_findings_sr_without_findings_says_absent(axial: Ingested, tmp_path: Path) -> None:
    target = tmp_path / "none.dcm"
    write_findings_sr(target, axial.sources, [], ALGORITHM, _identity("none"))
    items = sr_content_items(pydicom.dcmread(target))
    evaluations = [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
                   for i in items if i.ValueType == "CODE"
                   and i.ConceptNameCodeSequence[0].CodeValue == "27925004"]
    assert evaluations == [("27925004", "272519000")]  # Nodule: Absent
    texts = {i.TextValue for i in items if i.ValueType == "TEXT"}
    assert "No nodule" in texts
    assert read_findings_sr(target).findings == []
    assert read_findings_sr(target).frame_of_reference_uid is None


@pytest.mark.parametrize(("finding", "message"), [
    (PointFinding((0.0, float("nan"), 0.0)), "three finite numbers"),
    (PointFinding((0.0, 0.0)), "three finite numbers"),  # type: ignore[arg-type]
    (PointFinding((0.0, 0.0, 0.0), diameter_mm=0.0), "positive"),
    (PointFinding((0.0, 0.0, 0.0), diameter_mm=float("inf")), "positive"),
    (PointFinding((0.0, 0.0, 0.0), score=1.5), r"\[0, 1\]"),
    (PointFinding((0.0, 0.0, 0.0), score=-0.1), r"\[0, 1\]"),
])
def test_findings_sr_refuses_bad_findings(axial: Ingested, tmp_path: Path, finding: PointFinding,
                                          message: str) -> None:
    with pytest.raises(DicomError, match=message):
        write_findings_sr(tmp_path / "x.dcm", axial.sources, [finding], ALGORITHM, _identity("bad"))
    assert not (tmp_path / "x.dcm").exists()


def test_findings_sr_edges_of_the_ranges_are_accepted(axial: Ingested, tmp_path: Path) -> None:
    findings = [PointFinding((0.0, 0.0, 0.0), diameter_mm=0.01, score=0.0),
                PointFinding((1.0, 0.0, 0.0), score=1.0)]
    write_findings_sr(tmp_path / "x.dcm", axial.sources, findings, ALGORITHM, _identity("edges"))
    assert sorted(f.score for f in read_findings_sr(tmp_path / "x.dcm").findings) == [0.0, 1.0]


def test_read_findings_sr_refuses_what_is_not_a_report(axial: Ingested) -> None:
    # the message names what the file is, so a user sees which object was passed by mistake
    with pytest.raises(DicomError, match=r"^not a DICOM SR \(Modality 'CT'\)$"):
        read_findings_sr(axial.sources[0])
    not_tid1500 = pydicom.Dataset()
    not_tid1500.Modality = "SR"
    with pytest.raises(DicomError, match=r"^not a TID 1500 measurement report: "):
        read_findings_sr(not_tid1500)


def test_third_party_report_gives_its_volumetric_point_and_skips_2d_regions(shared_data: Path) -> None:
    # highdicom's own test report: planar groups with a 2D CIRCLE (Nodule, with a finding site) and a 2D
    # POLYLINE (Aorta), then a volumetric group whose volume surface is a 3D POINT (Vertebra, with a Volume
    # measurement, not a diameter). Only the last is a point finding, and the 2D groups before it must not stop
    # the reading. Reading it crashed with an AttributeError until the volume surface's graphic data was read.
    path = shared_data / "highdicom_testfiles/data/test_files/sr_document_with_multiple_groups.dcm"
    report = read_findings_sr(path)
    (vertebra,) = report.findings
    # GraphicData is VR FL: the float32 values of 123.5, 234.1, -23.7
    assert vertebra.center == (123.5, float(np.float32(234.1)), float(np.float32(-23.7)))
    assert (vertebra.finding.value, vertebra.finding.scheme_designator, vertebra.finding.meaning) == (
        "51282000", "SCT", "Vertebra")
    assert (vertebra.label, vertebra.diameter_mm, vertebra.score, vertebra.finding_site) == (
        "Vertebra0001", None, None, None)
    assert vertebra.tracking_uid == "1.2.826.0.1.3680043.10.511.3.43363410740787689196585073927400170"
    assert report.frame_of_reference_uid == "1.3.6.1.4.1.5962.1.4.1.1.20040119072730.12322"
    assert report.referenced_series == ["1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"]
    # highdicom's single-group report has one 2D circle and no evidence sequence: nothing, and no series
    single = read_findings_sr(shared_data / "highdicom_testfiles/data/test_files/sr_document.dcm")
    assert (single.findings, single.frame_of_reference_uid, single.referenced_series) == ([], None, [])


def test_findings_without_type_or_tracking_uid_and_evidence_without_series(axial: Ingested,
                                                                            tmp_path: Path) -> None:
    # what another writer may leave out: the finding type (read as the default, Nodule), the tracking UID
    # (None, not the text "None"), the series list of an evidence item (skipped, not a crash)
    target = tmp_path / "sr.dcm"
    write_findings_sr(target, axial.sources, [PointFinding((1.0, 2.0, 3.0), label="A")], ALGORITHM,
                      _identity("bare"))
    ds = pydicom.dcmread(target)
    for item in sr_content_items(ds):
        kept = [c for c in item.get("ContentSequence", [])
                if c.ConceptNameCodeSequence[0].CodeValue not in ("121071", "112040")]  # Finding, Tracking UID
        if "ContentSequence" in item:
            item.ContentSequence = kept
    assert not [i for i in sr_content_items(ds) if i.ConceptNameCodeSequence[0].CodeValue in ("121071", "112040")]
    ds.CurrentRequestedProcedureEvidenceSequence.append(pydicom.Dataset())
    (finding,) = read_findings_sr(ds).findings
    assert (finding.label, finding.center, finding.tracking_uid) == ("A", (1.0, 2.0, 3.0), None)
    assert (finding.finding.value, finding.finding.meaning) == ("27925004", "Nodule")
    assert read_findings_sr(ds).referenced_series == [str(axial.sources[0].SeriesInstanceUID)]


# -- classifier reports ------------------------------------------------------------------------------

MAMMOGRAPHY = {"scheme": "SCT", "value": "241055006", "meaning": "Mammography"}
NEOPLASM = {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}
BREAST = {"scheme": "SCT", "value": "76752008", "meaning": "Breast"}
LONG_LABEL = "Varicella zoster virus infection of the skin, suspected on all these images"  # 75 characters


def test_classification_sr_groups_read_back_by_hand(axial: Ingested, tmp_path: Path) -> None:
    from medpipe.dicom.output import derive_uid
    algorithm = AlgorithmSpec("cls-net", "2.1", source="Acme Lab", parameters={"checkpoint": "ab"})
    identity = _identity("cls")
    # the ends of [0, 1] are valid probabilities and thresholds; probability >= threshold is Present
    results = [ClassResult(NEOPLASM, 1.0, 1.0, label="tumour", finding_site=BREAST),
               ClassResult(NEOPLASM | {"value": "363346000", "meaning": "Malignant neoplastic disease"}, 0.0, 0.0),
               ClassResult(NEOPLASM | {"value": "38907003", "meaning": "Varicella"}, 0.25, 0.5, label=LONG_LABEL)]
    target = tmp_path / "cls.dcm"
    write_classification_sr(target, axial.sources, results, algorithm, identity, procedure=MAMMOGRAPHY)
    ds = pydicom.dcmread(target)
    assert [i.ConceptCodeSequence[0].CodeValue for i in sr_content_items(ds)
            if i.ConceptNameCodeSequence[0].CodeValue == "121058"] == ["241055006"]  # the procedure given
    groups = sr_groups(ds)
    # the label, else the finding's meaning; cut to the 64 characters of a Tracking Identifier (TEXT, but LO-sized)
    assert [g["112039"] for g in groups] == [["tumour"], ["Malignant neoplastic disease"], [LONG_LABEL[:64]]]
    assert [g["121071"] for g in groups] == [["108369006"], ["363346000"], ["38907003"]]
    assert [g.get("363698007") for g in groups] == [["76752008"], None, None]  # a finding site where given
    for g, r, decision in zip(groups, results, ["52101004", "52101004", "272519000"], strict=True):
        code = g["121071"][0]
        assert g[code] == [decision]  # the decision: Present / Present / Absent
        assert [float(v) for v in g["122157"]] == [r.probability]
        # each group names the algorithm in full, with its own threshold among the parameters
        assert (g["111001"], g["111003"], g["122405"]) == (["cls-net"], ["2.1"], ["Acme Lab"])
        assert g["111002"] == ["checkpoint=ab", f"threshold={r.threshold:g}"]
    # tracking UIDs: from the report's own instance UID, the class's place and its finding code, so that
    # the same scoring gives the same UIDs and another report other ones
    assert [g["112040"] for g in groups] == [
        [derive_uid(identity.sop_instance_uid, "class", i, "SCT", code)]
        for i, code in enumerate(["108369006", "363346000", "38907003"])]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"results": []}, r"^at least one class result is needed$"),
    ({"probability_concept": {"scheme": "DCM", "value": "122157"}},
     r"^probability concept: expected \{scheme, value, meaning\}, missing meaning$"),
    ({"results": [{"finding": {"value": "1"}}]}, r"^class 0 finding: expected \{scheme, value, meaning\}"),
    ({"results": [{"finding_site": "Breast"}]}, r"^class 'Neoplasm' finding site: expected a pydicom Code"),
    ({"results": [{"threshold": 1.5}]}, r"^class 'Neoplasm': probability and threshold must lie in \[0, 1\]$"),
    ({"results": [{"probability": -0.01}]}, r"^class 'Neoplasm': probability and threshold must lie in \[0, 1\]$"),
])
def test_classification_sr_refuses_what_it_cannot_code(axial: Ingested, tmp_path: Path, kwargs: dict,
                                                       message: str) -> None:
    options = dict(kwargs)
    results = [ClassResult(**({"finding": NEOPLASM, "probability": 0.5, "threshold": 0.5} | r))
               for r in options.pop("results", [{}])]
    with pytest.raises(DicomError, match=message):
        write_classification_sr(tmp_path / "x.dcm", axial.sources, results, ALGORITHM, _identity("bad"), **options)
    assert not (tmp_path / "x.dcm").exists()


# -- findings reports: what they need from the sources ----------------------------------------------


def test_findings_sr_of_one_source_image_and_its_procedure(axial: Ingested, tmp_path: Path) -> None:
    target = tmp_path / "one.dcm"
    write_findings_sr(target, axial.sources[:1], [PointFinding((1, 2, 3), diameter_mm=4)], ALGORITHM,
                      _identity("one"), procedure=MAMMOGRAPHY)
    ds = pydicom.dcmread(target)
    assert [i.ConceptCodeSequence[0].CodeValue for i in sr_content_items(ds)
            if i.ConceptNameCodeSequence[0].CodeValue == "121058"] == ["241055006"]
    (finding,) = read_findings_sr(ds).findings  # integers are numbers too
    assert (finding.center, finding.diameter_mm) == ((1.0, 2.0, 3.0), 4.0)


def test_findings_sr_needs_a_frame_of_reference(axial: Ingested, tmp_path: Path) -> None:
    source = pydicom.dcmread(axial.files[0], stop_before_pixels=True)
    del source.FrameOfReferenceUID
    sources = [source]
    with pytest.raises(DicomError, match=r"^the source series has no Frame Of Reference UID: points cannot be "
                                         r"given in its space$"):
        write_findings_sr(tmp_path / "x.dcm", sources, [], ALGORITHM, _identity("nofor"))


def test_findings_sr_groups_name_the_algorithm_and_derive_their_tracking_uids(axial: Ingested,
                                                                              tmp_path: Path) -> None:
    from medpipe.dicom.output import derive_uid

    algorithm = AlgorithmSpec("det-net", "3.0", source="Acme Lab")
    identity = _identity("uids")
    findings = [PointFinding((0.0, 0.0, 0.0), label=LONG_LABEL), PointFinding((1.0, 0.0, 0.0)),
                PointFinding((2.0, 0.0, 0.0), tracking_uid="1.2.826.0.1.3680043.8.498.7")]
    target = tmp_path / "f.dcm"
    write_findings_sr(target, axial.sources, findings, algorithm, identity)
    groups = sr_groups(pydicom.dcmread(target))
    assert [(g["111001"], g["111003"], g["122405"]) for g in groups] == [(["det-net"], ["3.0"], ["Acme Lab"])] * 3
    assert [g["112039"] for g in groups] == [[LONG_LABEL[:64]], ["Finding 2"], ["Finding 3"]]
    # a finding's own tracking UID is kept; the others derive from the report's instance UID and the
    # finding's place (from 1), so the same scoring gives the same UIDs and another report other ones
    assert [g["112040"] for g in groups] == [[derive_uid(identity.sop_instance_uid, "finding", 1)],
                                             [derive_uid(identity.sop_instance_uid, "finding", 2)],
                                             ["1.2.826.0.1.3680043.8.498.7"]]


def test_findings_sr_absent_of_another_kind(axial: Ingested, tmp_path: Path) -> None:
    from medpipe.dicom.output import derive_uid

    mass = {"scheme": "SCT", "value": "4147007", "meaning": "Mass"}
    identity = _identity("absent")
    target = tmp_path / "none.dcm"
    write_findings_sr(target, axial.sources, [], ALGORITHM, identity, absent=mass)
    (group,) = sr_groups(pydicom.dcmread(target))
    assert group["121071"] == ["4147007"] and group["4147007"] == ["272519000"]  # Mass: Absent
    assert group["112039"] == ["No mass"]
    assert (group["111001"], group["111003"]) == (["test-detector"], ["0.1"])  # who says it is absent
    assert group["112040"] == [derive_uid(identity.sop_instance_uid, "no finding")]
    # a meaning of the full 64 characters: "No ..." is cut to 64 characters
    long = {"scheme": "SCT", "value": "38907003", "meaning": LONG_LABEL[:64]}
    write_findings_sr(target, axial.sources, [], ALGORITHM, identity, absent=long)
    (group,) = sr_groups(pydicom.dcmread(target))
    assert group["112039"] == [f"No {LONG_LABEL[:64].lower()}"[:64]]


@pytest.mark.parametrize(("finding", "options", "message"), [
    (PointFinding((0.0, 0.0, 0.0), label="A", finding={"value": "1"}), {}, r"^finding 'A' type: expected "),
    (PointFinding((0.0, 0.0, 0.0), label="A", finding_site="Lung"), {}, r"^finding 'A' site: expected a pydicom Code"),
    # what highdicom refuses is named by the finding it came from
    (PointFinding((0.0, 0.0, 0.0), label="A", tracking_uid=5), {}, r"^finding 'A': .*UID"),  # type: ignore[arg-type]
    (None, {"absent": {"scheme": "SCT"}}, r"^absent finding: expected \{scheme, value, meaning\}, missing value"),
])
def test_findings_sr_names_what_it_cannot_code(axial: Ingested, tmp_path: Path, finding: PointFinding | None,
                                               options: dict, message: str) -> None:
    with pytest.raises(DicomError, match=message):
        write_findings_sr(tmp_path / "x.dcm", axial.sources, [finding] if finding else [], ALGORITHM,
                          _identity("bad"), **options)
    assert not (tmp_path / "x.dcm").exists()


# -- a third party's SEG ----------------------------------------------------------------------------


def test_seg_sr_of_highdicoms_ct_segmentation(shared_data: Path, tmp_path: Path) -> None:
    # highdicom's test SEG: one segment ("first segment", Tissue / Bone, Tracking ID "Bone") on its one CT image
    from medpipe.dicom.sr import write_seg_sr

    files = shared_data / "highdicom_testfiles/data/test_files"
    seg = pydicom.dcmread(files / "seg_image_ct_binary_single_frame.dcm")
    ct = pydicom.dcmread(files / "ct_image.dcm", stop_before_pixels=True)
    identity = _identity("hd-seg")
    with pytest.raises(DicomError, match=r"^a single source frame has no slice spacing: pass volumes_ml$"):
        write_seg_sr(tmp_path / "x.dcm", seg, [ct], ALGORITHM, identity)
    # 1832 pixels x 0.661468^2 mm^2 x 5 mm slice = 4007.8 mm^3: passed in, as a caller with its own count would
    volume = 1832 * 0.661468 ** 2 * 5.0 / 1000.0
    target = tmp_path / "sr.dcm"
    write_seg_sr(target, seg, [ct], ALGORITHM, identity, volumes_ml={1: volume}, procedure=MAMMOGRAPHY)
    ds = pydicom.dcmread(target)
    (group,) = sr_groups(ds)
    assert group["112039"] == ["Bone"]  # the SEG's Tracking ID, then its Tracking UID
    assert group["112040"] == ["1.2.826.0.1.3680043.10.511.3.19138981091387755276045967689445284"]
    assert (group["121071"], group["276214006"]) == (["272673000"], ["85756007"])  # Finding: Bone; Category: Tissue
    assert [float(v) for v in group["118565006"]] == [pytest.approx(volume)]  # Volume
    assert group["121232"] == [str(ct.SeriesInstanceUID)]  # Source series for segmentation
    assert (group["111001"], group["111003"]) == (["test-detector"], ["0.1"])
    (segment,) = [i for i in sr_content_items(ds) if i.ValueType == "IMAGE" and "ReferencedSOPSequence" in i
                  and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]]
    ref = segment.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID, ref.ReferencedSegmentNumber) == (
        seg.SOPInstanceUID, seg.SOPClassUID, 1)
    assert [i.ConceptCodeSequence[0].CodeValue for i in sr_content_items(ds)
            if i.ConceptNameCodeSequence[0].CodeValue == "121058"] == ["241055006"]
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID, ct.SOPInstanceUID}
    assert ds.StudyInstanceUID == ct.StudyInstanceUID
    # a segment without Tracking ID / UID: its label, and a UID derived from the SEG instance and the number
    from medpipe.dicom.output import derive_uid

    del seg.SegmentSequence[0].TrackingID, seg.SegmentSequence[0].TrackingUID
    write_seg_sr(target, seg, [ct], ALGORITHM, identity, volumes_ml={1: volume})
    (group,) = sr_groups(pydicom.dcmread(target))
    assert group["112039"] == ["first segment"]
    assert group["112040"] == [derive_uid(seg.SOPInstanceUID, "segment", 1)]


def test_seg_sr_refusals_name_the_problem(shared_data: Path, tmp_path: Path) -> None:
    from medpipe.dicom.sr import NumericMeasurement, write_seg_sr

    files = shared_data / "highdicom_testfiles/data/test_files"
    seg = pydicom.dcmread(files / "seg_image_ct_binary_single_frame.dcm")
    ct = pydicom.dcmread(files / "ct_image.dcm", stop_before_pixels=True)
    other = pydicom.dcmread(files / "seg_image_ct_binary.dcm")  # a SEG of another series
    unreferenced = pydicom.dcmread(files / "seg_image_ct_binary_single_frame.dcm")
    del unreferenced.ReferencedSeriesSequence  # a SEG that names no series at all
    mean = NumericMeasurement({"scheme": "SCT", "value": "373098007", "meaning": "Mean"}, 1.0,
                              {"scheme": "UCUM", "value": "[hnsf'U]", "meaning": "Hounsfield unit"})
    cases = [
        (ct, {}, r"^not a DICOM SEG \(SOP Class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2\)$"),
        (other, {}, rf"^the SEG does not reference the source series {ct.SeriesInstanceUID}$"),
        (unreferenced, {}, rf"^the SEG does not reference the source series {ct.SeriesInstanceUID}$"),
        (seg, {"volumes_ml": {1: 1.0, 2: 1.0}}, r"^the SEG has no segment\(s\) \[2\] \(it has \[1\]\)$"),
        (seg, {"volumes_ml": {1: 1.0}, "measurements": {3: [mean]}}, r"^the SEG has no segment\(s\) \[3\]"),
        (seg, {"volumes_ml": {1: 1.0}, "measurements": {1: [NumericMeasurement({"value": "x"}, 1.0, mean.unit)]}},
         r"^segment 1 measurement name: expected \{scheme, value, meaning\}"),
        (seg, {"volumes_ml": {1: 1.0}, "measurements": {1: [NumericMeasurement(mean.name, 1.0, "HU")]}},
         r"^segment 1 measurement unit: expected a pydicom Code"),
    ]
    for source_seg, options, message in cases:
        with pytest.raises(DicomError, match=message):
            write_seg_sr(tmp_path / "x.dcm", source_seg, [ct], ALGORITHM, _identity("bad"), **options)
    assert not (tmp_path / "x.dcm").exists()


def test_observer_device_is_the_algorithm_on_the_writers_equipment(axial: Ingested, tmp_path: Path) -> None:
    from medpipe.dicom.output import Equipment, derive_uid

    equipment = Equipment(manufacturer="Acme Imaging", model_name="Reader 3", software_versions="3.1",
                          device_serial_number="SN-7", institution_name="General Hospital")
    algorithm = AlgorithmSpec("a" * 60 + "-net-v2", "1.0")  # 67 characters: the observer name keeps 64
    target = tmp_path / "obs.dcm"
    write_findings_sr(target, axial.sources, [], algorithm, _identity("obs"), equipment=equipment)
    ds = pydicom.dcmread(target)
    observer = {i.ConceptNameCodeSequence[0].CodeValue: i.get("TextValue") or i.get("UID")
                for i in ds.ContentSequence if i.ValueType in ("TEXT", "UIDREF")}
    assert observer == {
        "121012": derive_uid("medpipe.device", "Acme Imaging", "Reader 3", algorithm.name, "1.0"),
        "121013": algorithm.name[:64],  # Device Observer Name
        "121014": "Acme Imaging",  # Device Observer Manufacturer
        "121015": "Reader 3",  # Device Observer Model Name
    }
    # and the equipment module says who wrote the file
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions, ds.DeviceSerialNumber,
            ds.InstitutionName) == ("Acme Imaging", "Reader 3", "3.1", "SN-7", "General Hospital")
    # a machine's report: complete, preliminary, unverified; named after the algorithm unless the identity says
    assert (ds.CompletionFlag, ds.PreliminaryFlag, ds.VerificationFlag) == ("COMPLETE", "PRELIMINARY", "UNVERIFIED")
    assert ds.SeriesDescription == f"SR {algorithm.name}"[:64]
    named = OutputIdentity.derived("tests.dicom_sr", "named", series_number=951, created=CREATED,
                                   series_description="Lung nodules")
    write_findings_sr(target, axial.sources, [], algorithm, named)
    assert pydicom.dcmread(target).SeriesDescription == "Lung nodules"
    with pytest.raises(DicomError, match=r"^procedure reported: expected \{scheme, value, meaning\}, missing value"):
        write_findings_sr(tmp_path / "x.dcm", axial.sources, [], algorithm, named, procedure={"scheme": "SCT"})


@needs_dciodvfy
def test_classification_sr_of_an_enhanced_multiframe_source(axial: Ingested, shared_data: Path, tmp_path: Path) -> None:
    """Guards: a classifier's report on one enhanced multi-frame instance (the real Siemens XA10 file) is written
    and cites it as evidence (highdicom's image library reads a classic image's top-level Pixel Spacing: it raised
    AttributeError, so `medpipe score` of a classifier failed on enhanced series)."""
    ds = pydicom.dcmread(shared_data / "dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_2.dcm", stop_before_pixels=True)
    target = tmp_path / "enhanced.dcm"
    write_classification_sr(target, [ds], [ClassResult(NEOPLASM, 0.7, 0.5)], ALGORITHM, _identity("enhanced"))
    sr = pydicom.dcmread(target)
    top = [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence]
    assert "111028" not in top  # no Image Library
    evidence = [i.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert evidence == [ds.SOPInstanceUID]
    assert dciodvfy_errors(target) == []


def _library(path: Path) -> list[str]:
    """The SOP Instance UIDs in an SR's image library (TID 1600), sorted."""
    (library,) = [i for i in pydicom.dcmread(path).ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    return sorted(str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in sr_content_items(library)
                  if i.ValueType == "IMAGE")


def test_classification_sr_image_library_lists_the_describable_sources(axial: Ingested, tmp_path: Path) -> None:
    """Guards: classic sources each get an image library entry; one that highdicom cannot describe (no Pixel
    Spacing), even the first, leaves out only itself."""
    target = tmp_path / "classic.dcm"
    write_classification_sr(target, axial.sources, [ClassResult(NEOPLASM, 0.7, 0.5)], ALGORITHM, _identity("classic"))
    uids = [str(d.SOPInstanceUID) for d in axial.sources]
    assert _library(target) == sorted(uids)
    sources = [pydicom.Dataset(d) for d in axial.sources]
    del sources[0].PixelSpacing
    write_classification_sr(target, sources, [ClassResult(NEOPLASM, 0.7, 0.5)], ALGORITHM, _identity("no spacing"))
    assert _library(target) == sorted(uids[1:])


@needs_dciodvfy
@pytest.mark.parametrize(("name", "modality"), [("emri_small.dcm", "MR"), ("RG1_UNCR.dcm", "CR")])
def test_classification_sr_of_sources_highdicom_cannot_describe(tmp_path: Path, name: str, modality: str) -> None:
    """Guards: pydicom's multi-frame MR and its computed radiograph without Imager Pixel Spacing (real files) get a
    classifier's report citing them as evidence, without an image library entry (highdicom's descriptors read
    attributes these lack: AttributeError before)."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    assert ds.Modality == modality
    target = tmp_path / "sr.dcm"
    write_classification_sr(target, [ds], [ClassResult(NEOPLASM, 0.7, 0.5)], ALGORITHM, _identity(name))
    sr = pydicom.dcmread(target)
    assert "111028" not in [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence]
    evidence = [i.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert evidence == [ds.SOPInstanceUID]
    assert dciodvfy_errors(target) == []


@needs_dciodvfy
def test_reports_of_a_source_without_patient_id(axial: Ingested, tmp_path: Path) -> None:
    """Guards: a source an export left without Patient ID / Name (Type 2) gets reports with them present and empty,
    as every object must have them (highdicom stopped with AttributeError before); the source is untouched."""
    sources = [pydicom.Dataset(d) for d in axial.sources]
    for ds in sources:
        del ds.PatientID, ds.PatientName
    target = tmp_path / "sr.dcm"
    write_findings_sr(target, sources, [PointFinding((0.0, 0.0, 0.0))], ALGORITHM, _identity("no patient id"))
    sr = pydicom.dcmread(target)
    assert (sr.PatientID, str(sr.PatientName)) == ("", "")
    assert "PatientID" not in sources[0] and "PatientName" not in sources[0]
    assert dciodvfy_errors(target) == []


def test_sr_names_what_highdicom_refuses_in_a_source(tmp_path: Path) -> None:
    """Guards: a source highdicom cannot copy into the report (pydicom's big-endian file: Study Time '14:04:38',
    not a DICOM time) is a one-line DicomError naming the value, not a crash."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("ExplVR_BigEnd.dcm"), stop_before_pixels=True)
    with pytest.raises(DicomError, match=r"^cannot build the SR: Unable to convert non-conformant value '14:04:38' "
                                         r"to 'TM' object$"):
        write_classification_sr(tmp_path / "sr.dcm", [ds], [ClassResult(NEOPLASM, 0.7, 0.5)], ALGORITHM,
                                _identity("big endian"))
