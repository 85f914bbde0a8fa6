"""The de-identification engine on one dataset at a time: the table, keys, date shifts, text cleaning, actions.

The whole-export behaviour (no PHI left anywhere, valid objects, resume, sources) is in ``test_deid.py``.
Each expected value here is derived by hand from PS3.15 Table E.1-1 and the engine's documented rules.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from medpipe.deid.engine import Deidentifier, clean_text, shift_date, shift_datetime
from medpipe.deid.keys import DeidKey, load_key, load_or_create_key
from medpipe.deid.table import ActionTable, ProfileOptions, load_table
from medpipe.errors import ConfigError

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


def test_safe_private_on_a_real_siemens_header(shared_data: Path) -> None:
    """Retain Safe Private on a real Siemens EPI header (dcm_qa): only listed *numeric* attributes stay.

    The header holds (0019,100A) Number Of Images In Mosaic US 36 and (0019,100B) Slice Measurement Duration
    DS (both on the list, under creator "SIEMENS MR HEADER" in (0019,0010)), other (0019,10xx) attributes,
    the CSA headers (0029) and a second "SIEMENS MR HEADER" block in group 0051 (not listed: text such as
    "FoV 1392*1392"). Guards against: the creator looked up in the wrong slot for an odd element byte
    (0x0B); a listed attribute kept without its private creator; a text value kept in a listed slot (a name
    riding along); undeclared VRs (implicit VR file, or UN after a PACS transcoded it) refused or let through
    as text.
    """
    import struct
    from io import BytesIO

    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ImplicitVRLittleEndian

    path = shared_data / "dcm_qa" / "In" / "Orientation" / "axmb" / "AxAsc36mb2a" / "jpg1.dcm"
    opts = ProfileOptions(retain_safe_private=True)

    def kept(ds: Dataset) -> set[tuple[int, int, str]]:
        Deidentifier(KEY, opts).apply(ds)
        return {(e.tag.group, e.tag.element, e.VR) for e in ds.iterall() if e.tag.is_private}

    mosaic, duration = (0x0019, 0x100A), (0x0019, 0x100B)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds[mosaic].value == 36 and ds[duration].value == 11595  # what the test relies on
    assert kept(ds) == {(0x19, 0x10, "LO"), (0x19, 0x100A, "US"), (0x19, 0x100B, "DS")}
    assert ds[mosaic].value == 36 and ds[duration].value == 11595

    # a text value in a listed slot (the b-value's, (0019,100C)) goes, whatever the list says
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.add_new((0x0019, 0x100C), "LO", "SMITH^JOHN")
    assert kept(ds) == {(0x19, 0x10, "LO"), (0x19, 0x100A, "US"), (0x19, 0x100B, "DS")}

    # without its private creator nobody can say what an element is: it goes
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    del ds[0x00190010]
    assert kept(ds) == set()

    # UN (an explicit-VR copy made by a PACS that does not know the private dictionary): the list's VR stands
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds[mosaic] = DataElement(mosaic, "UN", struct.pack("<H", 36))  # US 36, little endian
    ds[duration] = DataElement(duration, "UN", b"11595 ")  # DS, padded to even length
    assert kept(ds) == {(0x19, 0x10, "LO"), (0x19, 0x100A, "UN"), (0x19, 0x100B, "UN")}

    # implicit VR little endian: no VR in the file at all; the list's VR stands
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    ds = pydicom.dcmread(buf)
    assert ds._dict[0x0019100A].VR is None  # read raw: the engine sees no VR
    assert kept(ds) == {(0x19, 0x10, "LO"), (0x19, 0x100A, "US"), (0x19, 0x100B, "DS")}


def test_public_attributes_the_dictionary_does_not_know_are_removed() -> None:
    """Beyond the table: a public (even group) attribute unknown to the data dictionary is removed, whatever
    VR the file declares, since nobody can say what it holds. Guards against such an attribute surviving in an
    explicit-VR file (it did: only implicit-VR ones, without a VR, were removed), and against the repeating
    groups (60xx overlays) being taken for unknown ones: a kept overlay attribute stays.
    """
    from io import BytesIO

    import pydicom
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ImplicitVRLittleEndian

    for implicit in (False, True):
        ds = _dataset()
        ds.add_new((0x0010, 0x9999), "LO", "Smith^John")  # in the Patient group, not in PS3.6
        ds.add_new((0x6002, 0x0010), "US", 16)  # Overlay Rows, an overlay without Overlay Data
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            buf = BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            buf.seek(0)
            ds = pydicom.dcmread(buf)
        Deidentifier(KEY).apply(ds)
        assert (0x0010, 0x9999) not in ds, implicit
        assert ds[0x60020010].value == 16, implicit


def test_the_vr_the_file_declares_decides() -> None:
    """The engine acts on a value in the VR its file declares, and on the dictionary's VR where the file has
    none usable. Guards against: a sequence stored as UN (explicit VR, by a PACS that did not know it, its
    items in implicit VR as PS3.5 6.2.2 says) not walked, so the Referenced Series' original UID stays; a
    Study Date written as DT read as DA (its shifted value lost) under Retain Modified Dates.
    """
    from io import BytesIO

    import pydicom
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ImplicitVRLittleEndian

    ds = _dataset()
    ref = Dataset()
    ref.SeriesInstanceUID = "1.2.3.4.9"
    ds.ReferencedSeriesSequence = Sequence([ref])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    ds = pydicom.dcmread(buf)
    ds._dict[0x00081115] = ds._dict[0x00081115]._replace(VR="UN")  # the raw element as an explicit-VR UN
    Deidentifier(KEY).apply(ds)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == KEY.uid("1.2.3.4.9")

    ds = _dataset()
    ds.add_new(0x00080020, "DT", "20240311101500")  # Study Date (DA in PS3.6) written as a date-time
    Deidentifier(KEY, ProfileOptions(retain_modified_dates=True)).apply(ds)
    assert ds.StudyDate == shift_datetime("20240311101500", KEY.date_shift_days("MRN-42")) != ""
