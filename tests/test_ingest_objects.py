"""Non-image objects (DICOM SEG, SR, RT) are explained in rejected.csv and catalogued with their references."""

from __future__ import annotations

import json
from pathlib import Path

from medpipe.catalog import Catalog
from medpipe.ingest import ingest
from medpipe.sample import generate_brain_tumor


def test_sample_segs_are_catalogued_with_their_flair_series(tmp_path: Path) -> None:
    infos = generate_brain_tumor(tmp_path / "sample", cases=2, seed=1, matrix=32, pixel_spacing=6.0, slices=8,
                                 slice_thickness=16.0)
    report = ingest(tmp_path / "sample", tmp_path / "out", workers=1)
    reasons = dict(report.rejected)
    with Catalog(tmp_path / "out" / "catalog.sqlite") as cat:
        objects = cat.objects()
    assert len(objects) == 2
    for info, obj in zip(infos, sorted(objects, key=lambda o: o["patient_id"]), strict=True):
        assert obj["kind"] == "DICOM SEG (segmentation)" and obj["modality"] == "SEG"
        assert obj["patient_id"] == info.patient_id and obj["study_uid"] == info.study_uid
        flair = next(v for v in report.volumes if v["patient_id"] == info.patient_id and v["series_description"] == "FLAIR")
        assert obj["referenced_series"] == flair["series_uid"]
        assert "catalogued" in reasons[obj["path"]]


def test_real_seg_sr_and_rtstruct(shared_data: Path, tmp_path: Path) -> None:
    report = ingest(shared_data / "highdicom_testfiles", tmp_path / "hd", workers=1)
    report2 = ingest(shared_data / "rtstruct", tmp_path / "rt", workers=1)
    with Catalog(tmp_path / "hd" / "catalog.sqlite") as cat:
        kinds = {o["kind"] for o in cat.objects()}
    assert {"DICOM SEG (segmentation)", "Comprehensive 3D SR"} <= kinds
    with Catalog(tmp_path / "rt" / "catalog.sqlite") as cat:
        rt = [o for o in cat.objects() if o["kind"] == "RT Structure Set"]
    assert rt and all(o["referenced_series"] for o in rt)
    for r in (report, report2):
        assert all(reason for _, reason in r.rejected)
    json.dumps(report.volumes)  # manifest rows are plain data
