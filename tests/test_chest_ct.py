"""``medpipe sample chest-ct``: synthetic chest CT phantoms, their organ SEG and nodule SR, through ingest and
the datalist builder (SEG labels and SR points), for every acquisition the sample makes.

Four small studies (64 x 64 pixels of ~6 mm, 5 mm slices) cover head-first axial, feet-first, prone and
gantry-tilted acquisitions; the whole module takes a few seconds.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medpipe.sample.chest_ct import ChestCase, ChestCtParams, generate_chest_ct, study_model
from medpipe.sample.chest_phantom import ORGANS
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy

TINY = {"matrix": 64, "min_thickness": 5.0, "max_thickness": 5.0, "nodule_free_fraction": 0.25}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ChestCase]]:
    out = tmp_path_factory.mktemp("chest")
    return out, generate_chest_ct(out, cases=4, seed=3, **TINY)


@pytest.fixture(scope="module")
def ingested(sample: tuple[Path, list[ChestCase]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medpipe.ingest import ingest

    out = tmp_path_factory.mktemp("chest_ingest")
    ingest(sample[0], out)
    return out


def _series(directory: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(directory.glob("*.dcm"))]


def _pixel_lps(ds: pydicom.Dataset) -> np.ndarray:
    """LPS of every pixel centre of a frame, ``(rows, columns, 3)``, from its own header (first principles)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    ps = np.asarray(ds.PixelSpacing, float)
    r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    return (np.asarray(ds.ImagePositionPatient, float) + c[..., None] * ps[1] * iop[:3]
            + r[..., None] * ps[0] * iop[3:])


def _walk(ds: pydicom.Dataset, keyword: str) -> list[object]:
    out = [ds.get(keyword)] if keyword in ds else []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out += _walk(item, keyword)
    return out


def test_every_acquisition_once_and_the_truth_files(sample: tuple[Path, list[ChestCase]]) -> None:
    out, cases = sample
    assert sorted(c.acquisition for c in cases) == ["axial", "feet-first", "prone", "tilted"]
    assert {c.patient_position for c in cases} == {"HFS", "FFS", "HFP"}
    tilted = next(c for c in cases if c.acquisition == "tilted")
    assert 10.0 <= abs(tilted.tilt_deg) <= 20.0
    assert sum(not c.nodules for c in cases) == 1, "a quarter of the studies without nodules"
    rows = list(csv.DictReader(open(out / "nodules.csv", encoding="utf-8")))
    assert len(rows) == sum(len(c.nodules) for c in cases) > 0
    for row in rows:
        assert 3.0 <= float(row["diameter_mm"]) <= 30.0
        assert row["kind"] in ("solid", "part-solid") and row["placement"] in ("interior", "pleural", "vascular")
    studies = list(csv.DictReader(open(out / "studies.csv", encoding="utf-8")))
    assert [s["acquisition"] for s in studies] == [c.acquisition for c in cases]
    assert all(float(s["lungs_ml"]) > 1000 and float(s["liver_ml"]) > 300 for s in studies)


def test_same_seed_same_bytes_and_no_rewrite(sample: tuple[Path, list[ChestCase]], tmp_path: Path) -> None:
    out, cases = sample
    again = generate_chest_ct(tmp_path / "again", cases=4, seed=3, workers=2, **TINY)
    assert [c.study_uid for c in again] == [c.study_uid for c in cases]

    def hashes(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "sample.json"}

    assert hashes(tmp_path / "again") == hashes(out), "two processes or one: the same files, byte for byte"
    marker = (tmp_path / "again" / "sample.json").stat().st_mtime_ns
    generate_chest_ct(tmp_path / "again", cases=4, seed=3, **TINY)
    assert (tmp_path / "again" / "sample.json").stat().st_mtime_ns == marker, "a complete sample is not rewritten"
    other = generate_chest_ct(tmp_path / "other", cases=1, seed=4, **TINY)
    assert other[0].study_uid != cases[0].study_uid


def test_ct_images_hold_hounsfield_units_where_the_seg_says(sample: tuple[Path, list[ChestCase]]) -> None:
    """The SEG read back with highdicom lies on the CT frames, and each organ has its tissue's density there."""
    import highdicom as hd

    expected = {1: (-950, -700), 3: (0, 80), 5: (20, 90), 6: (10, 80), 7: (0, 70), 8: (150, 500)}
    for case in sample[1]:
        series = _series(case.series_dir)
        assert {str(ds.SOPClassUID) for ds in series} == {"1.2.840.10008.5.1.4.1.1.2"}
        assert series[0].RescaleIntercept == -1024 and series[0].PatientPosition == case.patient_position
        hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in series])
        seg = hd.seg.segread(case.seg_path)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == list(ORGANS.values())
        assert {s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in seg.SegmentSequence} == {"91723000"}
        assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
            ["39607008", "110726009", "80891009", "15825003", "10200004", "78961009", "64033007", "421060004"]
        masks = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in series], combine_segments=True,
                                                  assert_missing_frames_are_empty=True)
        for value, (lo, hi) in expected.items():
            inside = masks == value
            assert inside.sum() > 20, (case.acquisition, ORGANS[value])
            assert lo < float(np.median(hu[inside])) < hi, (case.acquisition, ORGANS[value], np.median(hu[inside]))


def test_nodule_sr_points_are_the_csv_and_the_nodules_are_in_the_image(sample: tuple[Path, list[ChestCase]]) -> None:
    """The SR's SCOORD3D points are the truth, and a nodule's centre is dense tissue inside aerated lung: the
    frame nearest to the point, at the pixel nearest to it (found from the headers alone), is the nodule."""
    from medpipe.dicom.sr import read_findings_sr

    for case in sample[1]:
        report = read_findings_sr(case.sr_path)
        assert report.referenced_series == [case.series_uid]
        assert [(f.diameter_mm, f.label) for f in report.findings] == \
            [(n["diameter_mm"], f"Nodule {n['nodule']}") for n in case.nodules]
        for f, n in zip(report.findings, case.nodules, strict=True):  # SCOORD3D holds 32-bit floats
            np.testing.assert_allclose(f.center, n["center_lps"], atol=1e-4)
        if not case.nodules:
            texts = [str(v) for v in _walk(pydicom.dcmread(case.sr_path), "TextValue")]
            meanings = [str(v) for v in _walk(pydicom.dcmread(case.sr_path), "CodeMeaning")]
            assert "No nodule" in texts and "Absent" in meanings, "a study without nodules says so"
            continue
        assert report.frame_of_reference_uid == case.frame_of_reference_uid
        series = _series(case.series_dir)
        for n in case.nodules:
            if n["diameter_mm"] < 12 or n["placement"] == "pleural":
                continue  # at 6 x 6 x 5 mm pixels a small nodule is a partial-volume blur
            best = min(series, key=lambda ds: np.abs(_pixel_lps(ds) - n["center_lps"]).sum(-1).min())
            dist = np.linalg.norm(_pixel_lps(best) - np.asarray(n["center_lps"]), axis=-1)
            r, c = np.unravel_index(np.argmin(dist), dist.shape)
            value = best.pixel_array[r, c] + float(best.RescaleIntercept)
            assert value > (-700 if n["kind"] == "part-solid" else -300), (case.acquisition, n, value)


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(sample: tuple[Path, list[ChestCase]]) -> None:
    for case in sample[1]:
        for path in (next(case.series_dir.glob("*.dcm")), case.seg_path, case.sr_path):
            assert dciodvfy_errors(path) == [], path


def test_datalist_seg_labels_land_on_every_acquisition(ingested: Path, sample: tuple[Path, list[ChestCase]],
                                                       tmp_path: Path) -> None:
    """Ingest resamples the tilted stack; the SEG (on its sheared frames) still lands where the organs are."""
    from medpipe.data.channels import ChannelRule
    from medpipe.data.datalist_builder import SegLabels, build_items

    result = build_items(ingested, {"CT": ChannelRule(modality="CT")}, "CT", SegLabels(), work_dir=tmp_path)
    assert result.skipped == []
    assert result.label_methods == {"source instances": 3, "world space": 1}
    assert result.label_names == {v: n.lower() for v, n in ORGANS.items()}
    cases = {c.patient_id: c for c in sample[1]}
    for item in result.items:
        img = nib.load(item["label"])
        label = np.asarray(img.dataobj)
        image = nib.load(item["image"][0]).get_fdata()
        assert float(np.median(image[label == 1])) < -700, item["patient_id"]
        assert 20 < float(np.median(image[label == 5])) < 90, item["patient_id"]
        assert set(np.unique(label)) == set(range(9)), item["patient_id"]
        # the phantom itself at every voxel centre of the ingested grid (RAS -> LPS)
        case = cases[item["patient_id"]]
        model, _ = study_model(ChestCtParams(cases=4, seed=3, **TINY), case.index, case.acquisition, bool(case.nodules))
        ijk = np.indices(label.shape).reshape(3, -1).astype(float)
        ras = img.affine[:3, :3] @ ijk + img.affine[:3, 3:]
        truth = model.render((LPS_TO_RAS @ ras).reshape(3, *label.shape).astype(np.float32), 1.0).labels
        agree = float(np.mean(truth == label))
        assert agree > (0.97 if case.acquisition == "tilted" else 0.99), (case.acquisition, agree)


def test_datalist_sr_points(ingested: Path, sample: tuple[Path, list[ChestCase]], tmp_path: Path) -> None:
    from medpipe.data.channels import ChannelRule
    from medpipe.data.datalist_builder import SrLabels, build_items, datalist_document

    result = build_items(ingested, {"CT": ChannelRule(modality="CT")}, "CT", SrLabels(source="sr"), work_dir=tmp_path)
    assert result.label_methods == {"SR points": 4}
    truth = {c.patient_id: [(n["center_lps"], n["diameter_mm"]) for n in c.nodules] for c in sample[1]}
    for item in result.items:
        assert item["label"] is None
        assert [(f["center_lps"], f["diameter_mm"]) for f in item["findings"]] == truth[item["patient_id"]]
    assert sorted(result.strata().values()) == [0, 1, 1, 1], "studies with nodules form the stratum"
    doc = datalist_document(result, channels=["CT"], reference="CT", ingest_dir=ingested, seed=0, val=0.25, test=0.25)
    from medpipe.data.datalist import Datalist

    Datalist.model_validate(doc)
