"""``medpipe deid``: PS3.15 Table E.1-1 as data, no PHI left, valid objects, keyed and reproducible pseudonyms.

Checked on the real vendor-shaped files of the ``deid-data`` package and on a generated sample with PHI
planted everywhere (top level, nested sequences, private tags, free text). The leak check
(:mod:`medpipe.deid.audit`) picks identifying values by what they are, not by the table, and scans
every byte of every output file.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from medpipe.deid.audit import identifying_values, leaks
from medpipe.deid.engine import Deidentifier, clean_text, shift_date, shift_datetime
from medpipe.deid.keys import DeidKey, load_key, load_or_create_key
from medpipe.deid.run import DeidSettings, deidentify
from medpipe.deid.table import ActionTable, ProfileOptions, load_table
from medpipe.errors import ConfigError
from medpipe.sample.brain_tumor import SEG_SOURCE_SERIES, SERIES_NUMBERS
from tests.deid_helpers import deid_data_folder, new_dciodvfy_errors, planted_sample, planted_values
from tests.dicom_checks import DCIODVFY, needs_dciodvfy

KEY = DeidKey(bytes(range(32)))
OTHER_KEY = DeidKey(bytes(range(1, 33)))


# -- the table ---------------------------------------------------------------------------------


def test_table_is_the_standard_as_data() -> None:
    doc = load_table()
    assert "2026c" in doc["sources"]["basic"] and "2020-04-07" in doc["sources"]["options"]
    rows = {r["tag"]: r for r in doc["attributes"]}
    assert len(rows) > 650
    expect = {
        "(0010,0010)": "Z", "(0010,0020)": "Z/D", "(0020,000D)": "U", "(0002,0003)": "U", "(0008,0080)": "X/Z/D",
        "(0008,0081)": "X", "(0008,1010)": "X/Z/D", "(0018,1000)": "X/Z/D", "(0008,1140)": "X/Z/U*",
        "(50xx,xxxx)": "X", "(60xx,3000)": "X", "(odd,xxxx)": "X", "(0008,1030)": "X", "(0008,0020)": "Z",
    }
    assert {t: rows[t]["basic"] for t in expect} == expect
    basic = ActionTable()
    assert basic.action(0x00100010) == "Z"
    assert basic.action(0x50020030) == "X" and basic.action(0x60023000) == "X"  # masks match repeating groups
    assert basic.action(0x00280010) is None  # Rows: not in the table, kept
    opts = ActionTable(ProfileOptions(retain_modified_dates=True, clean_descriptors=True,
                                      retain_device_identity=True, retain_institution_identity=True,
                                      retain_patient_characteristics=True, retain_safe_private=True))
    assert opts.action(0x00080020) == "C"  # Study Date: modified
    assert opts.action(0x0008103E) == "C"  # Series Description: cleaned
    assert opts.action(0x00181000) == "K"  # Device Serial Number
    assert opts.action(0x00080080) == "K"  # Institution Name
    assert opts.action(0x00101010) == "K"  # Patient's Age
    assert opts.action(0x00100010) == "Z"  # Patient's Name: no option keeps it
    assert opts.private_action == "C"
    with pytest.raises(ConfigError, match="one of the Retain Longitudinal"):
        ProfileOptions(retain_full_dates=True, retain_modified_dates=True)
    with pytest.raises(ConfigError, match="unknown profile option 'retain-names'"):
        ProfileOptions.from_names(["retain-names"])


def test_combined_codes_follow_the_iod() -> None:
    t = ActionTable()
    ct, enhanced_ct, unknown = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.4"
    assert t.iod_type(0x00080023, enhanced_ct) == "1"  # Content Date: Type 1 in Enhanced CT
    assert t.resolve("Z/D", 0x00080023, enhanced_ct, True, True) == "D"
    assert t.resolve("Z/D", 0x00080023, ct, True, True) == "Z"  # Type 2C in CT Image
    assert t.resolve("X/Z", 0x00400555, enhanced_ct, True, True) == "Z"  # Acquisition Context Sequence: Type 2
    assert t.resolve("X/Z", 0x00400555, ct, True, True) == "X"  # ... and Type 3 in CT Image
    assert t.resolve("X/Z/D", 0x00081010, ct, True, True) == "X"  # Station Name: Type 3
    assert t.resolve("X", 0x00102297, ct, True, True) == "Z"  # Responsible Person: Type 2C (animals)
    assert t.resolve("X/Z/U*", 0x00081140, ct, True, True) == "U"
    # unknown IOD or inside a sequence: the choice that keeps objects valid
    assert t.resolve("X/Z/D", 0x00081010, unknown, True, True) == "D"
    assert t.resolve("X/Z/D", 0x00081010, unknown, True, False) == "Z"
    assert t.resolve("X/Z", 0x00081110, ct, False, True, is_sequence=True) == "X"


# -- keys and keyed values ----------------------------------------------------------------------


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.key"
    key, created = load_or_create_key(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_key(path)
    assert not created_again and again.uid("1.2.3") == key.uid("1.2.3") and again.key_id == key.key_id
    assert "secret" not in repr(key) and path.read_text().split()[-1] not in repr(key)
    (tmp_path / "bad.key").write_text("hello\n")
    with pytest.raises(ConfigError, match="not a medpipe de-identification key file"):
        load_key(tmp_path / "bad.key")


def test_keyed_uids_pseudonyms_and_shifts() -> None:
    uid = KEY.uid("1.2.840.113619.2.55.3.604688119")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == KEY.uid("1.2.840.113619.2.55.3.604688119")
    assert OTHER_KEY.uid("1.2.840.113619.2.55.3.604688119") != uid
    # a UUID of version 8 with the RFC 4122 variant, as 2.25 asks
    n = int(uid[5:])
    assert (n >> 76) & 0xF == 8 and (n >> 62) & 0x3 == 2
    assert KEY.patient_pseudonym("123") != KEY.patient_pseudonym("124") != OTHER_KEY.patient_pseudonym("123")
    assert KEY.patient_pseudonym("123", "HOSP-A") != KEY.patient_pseudonym("123", "HOSP-B")
    shifts = {KEY.date_shift_days(str(i)) for i in range(200)}
    assert all(-3652 <= s <= -1 for s in shifts) and len(shifts) > 150


def test_date_shifts_keep_precision() -> None:
    assert shift_date("20240301", -1) == "20240229"
    assert shift_date("2024", -400) == "2022"  # year precision stays a year
    assert shift_date("garbage", -1) == ""
    assert shift_datetime("20240301120000.5+0100", -1) == "20240229120000.5+0100"


def test_clean_text_removes_identifiers_dates_and_numbers() -> None:
    ids = ["Doe^Jonathan", "Doe", "Jonathan", "MRN-884211"]
    assert clean_text("FLAIR axial (Jonathan DOE) 1958-04-12 MRN-884211 acc 99887766", ids) == "FLAIR axial acc"
    assert clean_text("T2 coronal", ids) == "T2 coronal"


# -- one dataset ---------------------------------------------------------------------------------


def _dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.FrameOfReferenceUID = "1.2.840.10008.1.4.1.1"  # a well-known (Talairach) frame of reference: kept
    ds.PatientName = "Smith^John"
    ds.PatientID = "MRN-42"
    ds.PatientBirthDate = "19600312"
    ds.PatientSex = "M"
    ds.PatientAge = "064Y"
    ds.StudyDate = "20240311"
    ds.StudyTime = "101500"
    ds.SeriesDescription = "FLAIR axial John Smith"
    ds.DeviceSerialNumber = "SN-1"
    ds.InstitutionName = "General"
    ds.Modality = "MR"
    siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    siemens.add_new(0x0C, "IS", "1000")  # b-value: on the safe list, numeric
    siemens.add_new(0x08, "CS", "SMITH")  # not on the list
    other = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    other.add_new(0x10, "OB", b"John Smith\x00\x00")
    return ds


def test_basic_profile_on_one_dataset() -> None:
    ds = _dataset()
    m = Deidentifier(KEY).apply(ds)
    assert ds.PatientID == KEY.patient_pseudonym("MRN-42") and ds.PatientName == ds.PatientID + "^"
    assert ds.PatientBirthDate == "" and ds.StudyDate == "" and ds.PatientSex == ""
    assert "SeriesDescription" not in ds and "InstitutionName" not in ds and "PatientAge" not in ds
    assert "DeviceSerialNumber" not in ds  # X/Z/D, Type 3 in MR Image
    assert ds.SOPInstanceUID == KEY.uid("1.2.3.4.5.6.7") == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.FrameOfReferenceUID == "1.2.840.10008.1.4.1.1"
    assert "SourceApplicationEntityTitle" not in ds.file_meta and ds.preamble == b"\x00" * 128
    assert not any(e.tag.is_private for e in ds.iterall())
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert m.uids[KEY.uid("1.2.3.4")] == "1.2.3.4" and m.patient[1]["PatientName"] == "Smith^John"
    assert m.study[0] == KEY.uid("1.2.3.4") and m.study[1]["StudyDate"] == "20240311"


def test_options_on_one_dataset() -> None:
    ds = _dataset()
    opts = ProfileOptions(retain_modified_dates=True, clean_descriptors=True, retain_device_identity=True,
                          retain_institution_identity=True, retain_patient_characteristics=True,
                          retain_safe_private=True)
    Deidentifier(KEY, opts).apply(ds)
    shift = KEY.date_shift_days("MRN-42")
    assert ds.StudyDate == shift_date("20240311", shift) != "20240311" and ds.StudyTime == "101500"
    assert ds.PatientBirthDate == ""  # no option keeps the birth date
    assert ds.SeriesDescription == "FLAIR axial"
    assert ds.DeviceSerialNumber == "SN-1" and ds.InstitutionName == "General"
    assert ds.PatientAge == "064Y" and ds.PatientSex == "M"
    private = {(e.tag.group, e.tag.element & 0xFF, e.VR) for e in ds.iterall() if e.tag.is_private}
    assert private == {(0x0019, 0x10, "LO"), (0x0019, 0x0C, "IS")}  # the creator and the b-value only
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113111", "113109", "113112", "113108", "113107", "113105"]


def test_user_pseudonyms_and_sequences() -> None:
    from medpipe.deid.engine import Pseudonym

    ds = _dataset()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.8"
    inner = Dataset()
    inner.PersonName = "Nurse^Ratched"
    inner.ContentSequence = Sequence([])
    item.ReferencedImageSequence = Sequence([])
    ds.SourceImageSequence = Sequence([item])
    ds.ContentSequence = Sequence([inner])
    Deidentifier(KEY, patient_map={"MRN-42": Pseudonym("STUDY-001", "Subject^One")}).apply(ds)
    assert ds.PatientID == "STUDY-001" and ds.PatientName == "Subject^One"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == KEY.uid("1.2.3.4.5.6.8")
    assert str(ds.ContentSequence[0].PersonName) != "Nurse^Ratched"


# -- whole exports ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deid_data_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("deid_data")
    settings = DeidSettings(key=root / "key", map=root / "map.json", allow_burned_in=True)
    report = deidentify(deid_data_folder(), root / "out", settings, workers=2)
    return root / "out", root / "map.json", {"report": report}


def _sources_by_uid(folder: Path) -> dict[str, tuple[Path, Dataset]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        out.setdefault(str(ds.SOPInstanceUID), (p, ds))
    return out


def test_deid_data_every_file_written_or_explained(deid_data_run: tuple[Path, Path, dict]) -> None:
    out, _, info = deid_data_run
    report = info["report"]
    n_sources = sum(1 for p in deid_data_folder().rglob("*") if p.is_file())
    assert report.n_files == n_sources
    with open(out / "rejected.csv", newline="") as fh:
        rejected = list(csv.DictReader(fh))
    dicoms = list(out.rglob("*.dcm"))
    assert len(dicoms) == report.written and report.written + len(rejected) == n_sources
    reasons = {r["reason"] for r in rejected}
    # README, __init__.py and the two cine zips are not DICOM; humans/ctbrain1 and 2 share a SOP Instance UID
    assert reasons <= {"not a DICOM file"} | {r for r in reasons if r.startswith("duplicate SOP Instance UID")}
    assert report.written == 12


def test_deid_data_no_phi_no_original_uid_same_pixels(deid_data_run: tuple[Path, Path, dict]) -> None:
    out, map_path, _ = deid_data_run
    sources = _sources_by_uid(deid_data_folder())
    uids = json.loads(map_path.read_text())["uids"]
    checked = 0
    for f in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        src_path, src = sources[uids[str(ds.SOPInstanceUID)]]
        values = identifying_values(src)
        assert len(values) >= 10, src_path
        assert leaks(f, values) == [], f"{src_path.name}: PHI left"
        assert ds.PixelData == src.PixelData, src_path.name  # byte for byte
        assert ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientIdentityRemoved == "YES"
        checked += 1
    assert checked == 12
    # the reports are scanned too: nothing of the sources' names or paths
    all_values = set().union(*(identifying_values(ds) for _, ds in sources.values()))
    for report in ("rejected.csv", "deid.json", ".deid-journal.jsonl"):
        assert leaks(out / report, all_values) == []
        assert "dicom-cookies" not in (out / report).read_text() and "ctbrain" not in (out / report).read_text()


@needs_dciodvfy
def test_deid_data_no_new_dciodvfy_errors(deid_data_run: tuple[Path, Path, dict]) -> None:
    out, map_path, _ = deid_data_run
    sources = _sources_by_uid(deid_data_folder())
    uids = json.loads(map_path.read_text())["uids"]
    for f in sorted(out.rglob("*.dcm")):
        src_path, _ = sources[uids[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)]]
        assert new_dciodvfy_errors(src_path, f) == [], src_path.name


def test_burned_in_text_is_quarantined_by_default(tmp_path: Path) -> None:
    report = deidentify(deid_data_folder(), tmp_path / "out", DeidSettings(key=tmp_path / "key"), workers=1)
    reasons = [r for _, r in report.rejected]
    assert sum("Burned In Annotation is YES" in r for r in reasons) == 2  # the grey-scale US and the multi-frame US
    assert sum("ultrasound image without Burned In Annotation NO" in r for r in reasons) == 1  # RGB US
    assert sum("secondary capture without Burned In Annotation NO" in r for r in reasons) == 9  # cookies, CT SCs
    assert report.written == 1  # the cat's DX says NO
    assert [p.parent.parent.parent.name for p in (tmp_path / "out").rglob("*.dcm")] != []


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    return planted_sample(root, cases=3)


def _all_values(src: Path, free_text: bool = True) -> set[str]:
    values = planted_values()
    for f in src.rglob("*.dcm"):
        values |= identifying_values(pydicom.dcmread(f), free_text=free_text)
    return values


@pytest.mark.parametrize("profile", [[], ["retain-modified-dates", "clean-descriptors", "retain-patient-characteristics"]])
def test_planted_phi_is_gone_everywhere(planted: tuple[Path, dict], tmp_path: Path, profile: list[str]) -> None:
    src, _ = planted
    options = ProfileOptions.from_names(profile)
    report = deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k", map=tmp_path / "m.json",
                                                              options=options), workers=2)
    assert report.rejected == [] or {r for _, r in report.rejected} == {"not a DICOM file"}
    values = _all_values(src, free_text=not profile)
    found = {str(f.relative_to(tmp_path)): leaks(f, values) for f in (tmp_path / "out").rglob("*") if f.is_file()}
    assert {k: v for k, v in found.items() if v} == {}
    # the private map does hold them (that is its job), and it is 0600
    assert leaks(tmp_path / "m.json", {"MRN-884211"}) == ["MRN-884211"]
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o600
    # valid objects: no dciodvfy error that the source did not have (every SEG, three images)
    if DCIODVFY is not None:
        uids = json.loads((tmp_path / "m.json").read_text())["uids"]
        sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in src.rglob("*.dcm")}
        outputs = sorted((tmp_path / "out").rglob("*.dcm"))
        firsts = list({p.parent: p for p in outputs}.values())  # one file per series
        segs = [p for p in firsts if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
        for p in segs + [p for p in firsts if p not in segs][:3]:
            source = sources[uids[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)]]
            assert new_dciodvfy_errors(source, p) == [], source.relative_to(src)


def test_same_key_same_bytes_other_key_other_names(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    (tmp_path / "key").write_text("medpipe-deid-key v1\n" + "ab" * 32 + "\n")
    a = deidentify(src, tmp_path / "a", DeidSettings(key=tmp_path / "key"), workers=2)
    b = deidentify(src, tmp_path / "b", DeidSettings(key=tmp_path / "key"), workers=1)
    files_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*.dcm")}
    files_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*.dcm")}
    assert a.written == b.written == len(files_a) and files_a == files_b
    (tmp_path / "key2").write_text("medpipe-deid-key v1\n" + "cd" * 32 + "\n")
    deidentify(src, tmp_path / "c", DeidSettings(key=tmp_path / "key2"), workers=2)
    uids_a = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "a").rglob("*.dcm")}
    uids_c = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "c").rglob("*.dcm")}
    assert len(uids_c) == len(uids_a) and not uids_a & uids_c
    assert {p.name for p in (tmp_path / "a").iterdir() if p.is_dir()}.isdisjoint(
        p.name for p in (tmp_path / "c").iterdir() if p.is_dir())  # other patient pseudonyms
    # the key never lands in an output
    secret = (tmp_path / "key").read_text().split()[-1]
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert secret.encode() not in data and bytes.fromhex(secret) not in data


def test_seg_references_its_deidentified_series(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k"), workers=2)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in
              (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "out").rglob("*.dcm"))}
    segs = [ds for ds in by_uid.values() if ds.Modality == "SEG"]
    assert len(segs) == 3
    for seg in segs:
        ref_series = seg.ReferencedSeriesSequence[0]
        refs = [str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence]
        frame_refs = {str(src_item.ReferencedSOPInstanceUID)
                      for fg in seg.PerFrameFunctionalGroupsSequence
                      for der in fg.DerivationImageSequence for src_item in der.SourceImageSequence}
        assert refs and set(refs) | frame_refs <= set(by_uid)  # every reference resolves in the output
        for uid in refs:
            image = by_uid[uid]
            assert image.SeriesInstanceUID == ref_series.SeriesInstanceUID
            assert image.StudyInstanceUID == seg.StudyInstanceUID and image.PatientID == seg.PatientID
            assert image.FrameOfReferenceUID == seg.FrameOfReferenceUID
            assert image.SeriesNumber == SERIES_NUMBERS[SEG_SOURCE_SERIES]
    # SEG and images of one case sit in one study folder of the tree
    assert {p.parent.parent.name for p in (tmp_path / "out").rglob("*.dcm")} == {s.StudyInstanceUID for s in segs}


def test_modified_dates_one_shift_per_patient_across_studies(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted  # cases 1 and 3 are two studies of the same planted patient
    originals: dict[str, tuple[str, str]] = {}  # SOP UID -> (study date, patient)
    for f in src.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        originals[str(ds.SOPInstanceUID)] = (str(ds.StudyDate), str(ds.PatientID))
    settings = DeidSettings(key=tmp_path / "k", map=tmp_path / "m.json",
                            options=ProfileOptions(retain_modified_dates=True))
    deidentify(src, tmp_path / "out", settings, workers=2)
    uids = json.loads((tmp_path / "m.json").read_text())["uids"]
    import datetime as dt

    shifts: dict[str, set[int]] = {}
    studies: dict[str, set[str]] = {}
    for p in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        date, patient = originals[uids[str(ds.SOPInstanceUID)]]
        days = (dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d") - dt.datetime.strptime(date, "%Y%m%d")).days
        shifts.setdefault(patient, set()).add(days)
        studies.setdefault(patient, set()).add(str(ds.StudyInstanceUID))
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert len(shifts) == 2 and all(len(s) == 1 and next(iter(s)) < 0 for s in shifts.values())
    assert max(len(s) for s in studies.values()) == 2  # the shift held across the patient's two studies


def test_resume_after_an_interrupted_run(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    settings = DeidSettings(key=tmp_path / "k")
    first = deidentify(src, tmp_path / "out", settings, workers=1)
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    before = {p: p.read_bytes() for p in outputs}
    # as if killed: the last files never written and the journal cut mid-line
    for p in outputs[-5:]:
        p.unlink()
    journal = tmp_path / "out" / ".deid-journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-10]) + "\n" + lines[-10][:17])
    again = deidentify(src, tmp_path / "out", settings, workers=1)
    assert again.n_done == 15  # 10 lost journal lines (incl. the cut one) + 5 deleted files
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.dcm"))} == before
    assert again.written == first.written
    with pytest.raises(ConfigError, match="another key or profile"):
        deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "other"), workers=1)


def test_key_and_map_must_stay_out_of_the_output(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    with pytest.raises(ConfigError, match="key file must not be inside the output"):
        deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "out" / "k"))
    with pytest.raises(ConfigError, match="map must not be inside the output"):
        deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k", map=tmp_path / "out" / "m.json"))


def test_patient_mapping_csv(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    csv_path = tmp_path / "patients.csv"
    csv_path.write_text("PatientID,PseudonymID,PseudonymName\nMRN-884211,TRIAL-001,Trial^One\n")
    deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k", patients=csv_path), workers=2)
    ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in (tmp_path / "out").rglob("*.dcm")}
    assert "TRIAL-001" in ids and len(ids) == 2
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in (tmp_path / "out" / "TRIAL-001").rglob("*.dcm")}
    assert names == {"Trial^One"}
    (tmp_path / "bad.csv").write_text("PatientID,Pseudo\n1,2\n")
    with pytest.raises(ConfigError, match="needs columns PatientID and PseudonymID"):
        deidentify(src, tmp_path / "out2", DeidSettings(key=tmp_path / "k", patients=tmp_path / "bad.csv"))


def test_zip_source(planted: tuple[Path, dict], tmp_path: Path) -> None:
    import zipfile

    src, _ = planted
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*.dcm"))[:12]:
            zf.write(p, p.relative_to(src))
    report = deidentify(archive, tmp_path / "out", DeidSettings(key=tmp_path / "k"), workers=1)
    assert report.written == 12 and report.rejected == []


def test_cli_deid(planted: tuple[Path, dict], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medpipe.cli import app

    src, _ = planted
    result = CliRunner().invoke(app, ["deid", str(src), "--out", str(tmp_path / "out"), "--key", str(tmp_path / "k"),
                                      "--profile", "retain-modified-dates,clean-descriptors", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "written" in result.output and "MRN-884211" not in result.output
    summary = json.loads((tmp_path / "out" / "deid.json").read_text())
    assert summary["options"] == ["retain_modified_dates", "clean_descriptors"] and summary["state"] == "complete"
    bad = CliRunner().invoke(app, ["deid", str(src), "--out", str(tmp_path / "o2"), "--key", str(tmp_path / "k"),
                                   "--profile", "retain-everything"])
    assert bad.exit_code == 2 and "unknown profile option 'retain-everything'" in bad.output


def test_deid_command_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from medpipe.cli import app; import medpipe.deid.run, medpipe.deid.reidentify; "
            "print(any(m in sys.modules for m in ('torch', 'monai', 'medpipe.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_fast_writer_gives_the_bytes_of_dcmwrite(planted: tuple[Path, dict]) -> None:
    """medpipe.deid.writer writes raw elements directly: the file must be byte-identical to pydicom's."""
    import io

    from pydicom.data import get_testdata_file

    from medpipe.deid.writer import dataset_bytes

    src, _ = planted
    files = [p for p in sorted(deid_data_folder().rglob("*.dcm")) if p.stat().st_size < 5_000_000]
    files += sorted(src.rglob("*.dcm"))[:3] + sorted(src.rglob("SEG/*.dcm"))[:1]
    files += [Path(get_testdata_file(n)) for n in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                                   "JPEG2000.dcm", "image_dfl.dcm")]
    fast = 0
    for path in files:
        ds = pydicom.dcmread(path)
        Deidentifier(KEY).apply(ds)
        expected = io.BytesIO()
        pydicom.dcmwrite(expected, ds, enforce_file_format=True)
        data = dataset_bytes(ds)
        if data is not None:
            assert data == expected.getvalue(), path.name
            fast += 1
    assert fast >= len(files) - 2  # all but big endian and deflate take the fast path


def test_overlays_and_curves_go_whole() -> None:
    """(60xx,3000) Overlay Data is X: the whole overlay group goes (no overlay without data); (50xx,xxxx) too."""
    ds = _dataset()
    for group in (0x6000, 0x6002):
        ds.add_new((group, 0x0010), "US", 16)
        ds.add_new((group, 0x0011), "US", 16)
        ds.add_new((group, 0x0040), "CS", "G")
        ds.add_new((group, 0x0050), "SS", [1, 1])
        ds.add_new((group, 0x0100), "US", 1)
        ds.add_new((group, 0x0102), "US", 0)
        ds.add_new((group, 0x3000), "OW", b"\x01\x00" * 16)
    ds.add_new((0x5000, 0x0005), "US", 2)
    Deidentifier(KEY).apply(ds)
    assert not [e for e in ds if e.tag.group in (0x5000, 0x6000, 0x6002)]


def test_dicomdir_source(planted: tuple[Path, dict], tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    src, _ = planted
    fs = FileSet()
    for p in sorted(src.rglob("*.dcm"))[:6]:
        fs.add(p)
    fs.write(tmp_path / "media")
    report = deidentify(tmp_path / "media" / "DICOMDIR", tmp_path / "out", DeidSettings(key=tmp_path / "k"), workers=1)
    assert report.n_files == 6 and report.written == 6
    values = _all_values(src)
    assert all(leaks(p, values) == [] for p in (tmp_path / "out").rglob("*") if p.is_file())
