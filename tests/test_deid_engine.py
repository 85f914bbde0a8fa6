"""The de-identification engine on one dataset at a time: the table, keys, date shifts, text cleaning, actions;
and, on one object at a time, re-identification, the burned-in text checks and the leak check (audit).

The whole-export behaviour (no PHI left anywhere, valid objects, resume, sources) is in ``test_deid.py``.
Each expected value here is derived by hand from PS3.15 Table E.1-1 and the engine's documented rules.
"""

from __future__ import annotations

import copy
import stat
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from medpipe.deid.engine import Deidentifier, Pseudonym, clean_text, shift_date, shift_datetime
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
    assert KEY.patient_pseudonym("123", "") != KEY.patient_pseudonym("124", "") != OTHER_KEY.patient_pseudonym("123", "")
    assert KEY.patient_pseudonym("123", "HOSP-A") != KEY.patient_pseudonym("123", "HOSP-B")
    shifts = {KEY.date_shift_days(str(i), "") for i in range(200)}
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
    assert ds.PatientID == KEY.patient_pseudonym("MRN-42", "") and ds.PatientName == ds.PatientID + "^"
    assert all(ds[k].is_empty for k in ("PatientBirthDate", "StudyDate", "PatientSex"))
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
    shift = KEY.date_shift_days("MRN-42", "")
    assert ds.StudyDate == shift_date("20240311", shift) != "20240311" and ds.StudyTime == "101500"
    assert ds["PatientBirthDate"].is_empty  # no option keeps the birth date
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

    # a kept element with an odd element byte keeps its own creator
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    del ds[mosaic]
    assert kept(ds) == {(0x19, 0x10, "LO"), (0x19, 0x100B, "DS")}

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
    assert ds.StudyDate == shift_datetime("20240311101500", KEY.date_shift_days("MRN-42", "")) != ""


def test_date_shifts_at_their_edges() -> None:
    """Single DA / DT values moved by hand-counted days (2024 is a leap year).

    Guards against: a month 10-12 or a day 10-31 read from the wrong digits; a YYYYMM date refused, or
    counted from another day than the 1st; a year-only date counted from another day than 1 January; a
    value of the wrong length or with separators shifted anyway; an impossible or out-of-range date giving
    anything but ''; a DT's UTC offset or its year-only precision lost.
    """
    assert shift_date("20241115", -1) == "20241114"  # month 11
    assert shift_date("20240311", -11) == "20240229"  # day 11
    assert shift_date("202403", -1) == "202402"  # YYYYMM stands for 1 March: 29 February, still YYYYMM
    assert shift_date("2024", -1) == "2023"  # YYYY stands for 1 January: 31 December 2023
    assert shift_date("2024031", -1) == shift_date("2024-03-11", -1) == ""  # 7 digits; separators
    assert shift_date("20240231", -1) == shift_date("00010101", -1) == ""  # 31 February; before year 1
    assert shift_datetime("2024", -1) == "2023" and shift_datetime("202403", -1) == "202402"
    assert shift_datetime("2024+0100", -1) == "2023+0100"  # year precision with a UTC offset
    assert shift_datetime("20240", -1) == shift_datetime("20241301120000", -1) == ""  # 5 digits; month 13


def test_keyed_values_follow_the_documented_constructions() -> None:
    """Every keyed value recomputed with hmac from the constructions in medpipe.deid.keys' docstring.

    Guards against: another purpose string (uses no longer kept apart), a part dropped (the issuer: patient
    123 of two hospitals would share a pseudonym and a date shift), another width or byte order of the
    number, a shift of 0 or past 10 years; any of which would also stop earlier maps from matching.
    """
    import base64
    import hashlib
    import hmac

    def mac(purpose: str, *parts: str) -> bytes:
        h = hmac.new(bytes(range(32)), purpose.encode(), hashlib.sha256)  # KEY's secret
        for part in parts:
            data = part.encode()
            h.update(b"\x00" + len(data).to_bytes(4, "big") + data)
        return h.digest()

    for pid, issuer in (("MRN-42", ""), ("MRN-42", "HOSP-A"), ("00007041776", "CCHS")):
        n = int.from_bytes(mac("medpipe.deid.date-shift", issuer, pid)[:8], "big")
        assert KEY.date_shift_days(pid, issuer) == -(1 + n % 3652)
        pseudonym = "P" + base64.b32encode(mac("medpipe.deid.patient", issuer, pid)[:10]).decode()[:12]
        assert KEY.patient_pseudonym(pid, issuer) == pseudonym
    assert KEY.date_shift_days("MRN-42", "") != KEY.date_shift_days("MRN-42", "HOSP-A")
    b = bytearray(mac("medpipe.deid.uid", "1.2.3.4")[:16])
    b[6], b[8] = (b[6] & 0x0F) | 0x80, (b[8] & 0x3F) | 0x80
    assert KEY.uid("1.2.3.4") == f"2.25.{int.from_bytes(b, 'big')}"
    assert KEY.file_ref("a/b.dcm") == "F" + mac("medpipe.deid.file", "a/b.dcm").hex()[:16]
    assert KEY.key_id == mac("medpipe.deid.key-id").hex()[:16]


def test_clean_text_edges() -> None:
    """Guards against: a shorter identifier tried before a longer one it begins (case aside), leaving the
    rest of the longer one ("ROE-77" leaving "77"); separators left at the ends; an X at either end taken
    for a separator ("XR", "AX"); no identifiers at all failing."""
    assert clean_text("ROE-77 follow-up", ["Roe", "ROE-77", "ROE"]) == "follow-up"
    assert clean_text("Doe, T2 FLAIR AX", ["Doe"]) == "T2 FLAIR AX"
    assert clean_text("XR chest PA", []) == "XR chest PA"


def test_descriptors_lose_every_form_of_the_identifiers() -> None:
    """Clean Descriptors removes the identifying values of the same dataset from the descriptions: whole
    name components, their words of 3+ characters, dates, private text; not what the profile keeps.

    Guards against: name components not split at ^ ("Li Wei" left as "Li"), components or words of exactly
    3 characters ("Kim", "Wei") missed, words of a component not split out, dates (an ACR-NEMA style birth
    date "1958.04.12", whose year alone then stays; a year-precision DT) left out, the values of kept
    attributes (Institution Name under Retain Institution Identity: "General anaesthesia") or the text of a
    sequence ("MR Image Storage" of a Referenced SOP Class) taken for identifiers.
    """
    ds = _dataset()
    ds.PatientName = "Ng^Li Wei^Kim"
    ds.PatientBirthDate = "1958.04.12"
    ds.DateTimeOfLastCalibration = "2019"  # X; a DT of year precision
    ds.InstitutionName = "General"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.8"
    ds.SourceImageSequence = Sequence([item])
    ds.SeriesDescription = "FLAIR Li Wei Wei Kim born 1958 cal 2019 General anaesthesia MR Image Storage"
    Deidentifier(KEY, ProfileOptions(clean_descriptors=True, retain_institution_identity=True)).apply(ds)
    assert ds.SeriesDescription == "FLAIR born cal General anaesthesia MR Image Storage"


def test_modified_dates_and_clean_descriptors_on_every_kind_of_value() -> None:
    """Retain Modified Dates and Clean Descriptors on a DT, several values, bytes, a legacy date, an issuer.

    Guards against: a DT shifted as a DA (or emptied); a DA shifted as a DT (the ACR-NEMA "1999.03.11" then
    keeps its month and day); the second value of a multi-valued date or description dropped; Maker Note
    bytes "cleaned" as text instead of emptied; the date shift or pseudonym made without the Issuer of
    Patient ID.
    """
    ds = _dataset()
    ds.IssuerOfPatientID = "HOSP-A"
    ds.AcquisitionDateTime = "20240311093015.5+0100"
    ds.SeriesDate = "1999.03.11"
    ds.DateOfLastCalibration = ["20240101", "20240201"]
    ds.AdmittingDiagnosesDescription = ["Headache John Smith", "Seizure 2024-03-01"]
    ds.MakerNote = b"Canon EOS 5D 0123456789"
    Deidentifier(KEY, ProfileOptions(retain_modified_dates=True, clean_descriptors=True)).apply(ds)
    shift = KEY.date_shift_days("MRN-42", "HOSP-A")
    assert shift != KEY.date_shift_days("MRN-42", "") and ds.PatientID == KEY.patient_pseudonym("MRN-42", "HOSP-A")
    assert ds.StudyDate == shift_date("20240311", shift)
    assert ds.AcquisitionDateTime == shift_datetime("20240311093015.5+0100", shift)
    assert ds.SeriesDate == ""
    assert list(ds.DateOfLastCalibration) == [shift_date("20240101", shift), shift_date("20240201", shift)]
    assert list(ds.AdmittingDiagnosesDescription) == ["Headache", "Seizure"]
    assert ds["MakerNote"].is_empty


# -- the map and the patient mapping CSV -----------------------------------------------------------


def test_map_file_refusals(tmp_path: Path) -> None:
    """read_map refuses what is not a map of this key with the message (and hint) a user sees.

    Guards against: a message or hint lost or changed; a JSON object that is not a map, or a JSON list,
    accepted or crashing.
    """
    import json
    import re

    from medpipe.deid.mapping import read_map

    missing = tmp_path / "none.json"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: no such map file$") as err:
        read_map(missing)
    assert err.value.hint == "give the map written by `medpipe deid` (--map)"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(broken))}: not a readable map file \(JSONDecodeError\)$"):
        read_map(broken)
    for doc in ([1], {"patients": {}}):
        other = tmp_path / "other.json"
        other.write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(other))}: not a medpipe de-identification map$"):
            read_map(other)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "medpipe-deid-map", "key_id": KEY.key_id,
                                "patients": {"P1": {"PatientName": "Muller^Jurgen"}}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(good))}: this map was made with another key "
                                          rf"\(key id {KEY.key_id}, not {OTHER_KEY.key_id}\)$") as err:
        read_map(good, OTHER_KEY.key_id)
    assert err.value.hint == "use the key the data was de-identified with"
    assert read_map(good, KEY.key_id)["uids"] == {}  # every section present


def test_patient_mapping_csv_rules(tmp_path: Path) -> None:
    """The user's patient mapping: columns, one line per patient, every refusal with its line number.

    Guards against: a byte order mark (Excel's UTF-8 CSV) hiding the PatientID column; exactly the two
    required columns refused; a missing PseudonymName not defaulting to the pseudonym; an empty or absent
    cell accepted; line numbers off by one; a pseudonym given twice, or one of 65 characters, accepted (64
    is the LO limit); an empty or missing file crashing instead of a message.
    """
    import re

    from medpipe.deid.engine import Pseudonym
    from medpipe.deid.mapping import read_patient_csv

    p = tmp_path / "patients.csv"

    def refused(text: str) -> str:
        p.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            read_patient_csv(p)
        return str(err.value).removeprefix(f"{p}")

    p.write_text("\ufeffPatientID,PseudonymID\r\nMRN-1,TRIAL-001\r\nMRN-2," + "T" * 64 + "\r\n", encoding="utf-8")
    assert read_patient_csv(p) == {"MRN-1": Pseudonym("TRIAL-001", "TRIAL-001"), "MRN-2": Pseudonym("T" * 64, "T" * 64)}
    p.write_text("PatientID,PseudonymID,PseudonymName\nMRN-1,TRIAL-001,Trial^One\nMRN-2,TRIAL-002,\n")
    assert read_patient_csv(p) == {"MRN-1": Pseudonym("TRIAL-001", "Trial^One"), "MRN-2": Pseudonym("TRIAL-002", "TRIAL-002")}
    head = "PatientID,PseudonymID\nMRN-1,TRIAL-001\n"
    assert refused(head + "MRN-2\n") == " line 3: empty PatientID or PseudonymID"
    assert refused(head + ",TRIAL-002\n") == " line 3: empty PatientID or PseudonymID"
    assert refused(head + "MRN-2,\n") == " line 3: empty PatientID or PseudonymID"
    assert refused(head + "MRN-1,TRIAL-002\n") == " line 3: PatientID listed twice"
    assert refused(head + "MRN-2,TRIAL-001\n") == " line 3: PseudonymID 'TRIAL-001' given to two patients"
    assert refused(head + "MRN-2," + "T" * 65 + "\n") == " line 3: PseudonymID longer than 64 characters (LO)"
    needs = ": the patient mapping needs columns PatientID and PseudonymID (optional PseudonymName)"
    assert refused("") == refused("PatientID,Pseudonym\n1,2\n") == needs
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'none.csv'))}: cannot read the patient "
                                          r"mapping \(No such file or directory\)$"):
        read_patient_csv(tmp_path / "none.csv")


def test_key_file_format(tmp_path: Path) -> None:
    """A key file: the header line and one hex line; comment and blank lines are allowed; anything else is
    refused with the message and hint a user sees.

    Guards against: comments or blank lines counted as lines; a wrong header or a third line accepted; a
    message or hint lost or changed; a binary file given as --key (a DICOM file: deid-data's head CT)
    crashing with a decoding error instead of the one-line refusal.
    """
    import re

    from tests.deid_helpers import deid_data_folder

    p = tmp_path / "site.key"
    line = bytes(range(32)).hex()  # KEY's secret
    p.write_text(f"# site A\nmedpipe-deid-key v1\n\n{line}\n")
    assert load_key(p).key_id == KEY.key_id
    not_a_key = r": not a medpipe de-identification key file \(expected 'medpipe-deid-key v1' and a hex line\)$"
    for text in (f"medpipe-deid-key v2\n{line}\n", f"medpipe-deid-key v1\n{line}\n{line}\n", None):
        if text is None:
            p.write_bytes((deid_data_folder() / "humans" / "ctbrain1.dcm").read_bytes())
        else:
            p.write_text(text)
        with pytest.raises(ConfigError, match="^" + re.escape(str(p)) + not_a_key) as err:
            load_key(p)
        assert err.value.hint == "point --key at the file medpipe created, or at a new path to create one"
    p.write_text(f"medpipe-deid-key v1\nzz{line[2:]}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: the key line is not hexadecimal$"):
        load_key(p)
    p.write_text(f"medpipe-deid-key v1\n{line[:30]}\n")
    with pytest.raises(ConfigError, match=r"^de-identification key too short \(need at least 16 bytes\)$"):
        load_key(p)
    p.write_text(f"medpipe-deid-key v1\n{line[:32]}\n")  # 16 bytes: enough
    assert load_key(p).key_id != KEY.key_id
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'none.key'))}: no such key file$") as err:
        load_key(tmp_path / "none.key")
    assert err.value.hint == "give the key the data was de-identified with"


def test_a_patient_without_id_is_known_by_name_and_birth_date() -> None:
    """No Patient ID: the name and birth date stand for the patient, as "\\x00" + name + "\\x00" + birth date
    (the engine's rule), for the pseudonym and the date shift.

    Guards against: an absent Patient ID read as some fixed text (every such patient sharing one pseudonym),
    or the name or the birth date left out of the stand-in identity.
    """
    a, b = _dataset(), _dataset()
    del a.PatientID, b.PatientID, b.PatientName
    Deidentifier(KEY).apply(a)
    Deidentifier(KEY).apply(b)
    assert a.PatientID == KEY.patient_pseudonym("\x00Smith^John\x0019600312", "")
    assert b.PatientID == KEY.patient_pseudonym("\x00\x0019600312", "")


def test_map_entries_hold_the_original_values() -> None:
    """What apply() hands to the map: the original Patient and General Study attributes as text.

    Guards against: a multi-valued value (Other Patient IDs) joined with anything but the DICOM backslash, an
    attribute present without a value recorded as anything but '', the study keyed on another UID.
    """
    ds = _dataset()
    ds.OtherPatientIDs = ["ID 1", "ID 2"]
    ds.add_new(0x00100032, "TM", None)  # Patient's Birth Time, present without a value
    m = Deidentifier(KEY).apply(ds)
    pseudo = KEY.patient_pseudonym("MRN-42", "")
    assert m.patient == (pseudo, {
        "PatientName": "Smith^John", "PatientID": "MRN-42", "PatientBirthDate": "19600312", "PatientSex": "M",
        "OtherPatientIDs": "ID 1\\ID 2", "PatientAge": "064Y", "PatientBirthTime": "", "date_shift_days": 0})
    assert m.study == (KEY.uid("1.2.3.4"), {"StudyInstanceUID": "1.2.3.4", "StudyDate": "20240311",
                                            "StudyTime": "101500", "PatientID": pseudo})


def test_sequence_items_are_not_the_top_level() -> None:
    """Inside a sequence item the IOD's Types do not apply: a combined code gives D where there is a value
    (ActionTable.resolve). Guards against items walked as the top level: an Observation DateTime (X/D, Type 3
    at the top of an MR Image) removed instead of given the DT dummy value.
    """
    ds = _dataset()
    item = Dataset()
    item.ObservationDateTime = "20240311101500"
    ds.ContentSequence = Sequence([item])
    Deidentifier(KEY).apply(ds)
    assert ds.ContentSequence[0].ObservationDateTime == "19000101000000"


def test_dummies_and_emptied_sequences_inside_an_sr_observer() -> None:
    """D and Z inside a walked sequence: a Verifying Observer (D) of an SR keeps its item; its name and
    organization get the text dummy, its date-time the DT dummy, its Identification Code Sequence (Z) loses
    its items; Frame Origin Timestamp (OB, D) becomes two zero bytes (an OB's dummy).

    Guards against: a Z sequence walked instead of emptied, the Patient ID pseudonym or a remapped "UID" given
    as any dummy, a dummy left empty or of another VR's form.
    """
    ds = _dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "12345", "99HOSP", "Staff ID of Dr Who"
    observer = Dataset()
    observer.VerifyingObserverName = "Who^Doctor"
    observer.VerifyingOrganization = "General"
    observer.VerificationDateTime = "20240311101500"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence([code])
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.FrameOriginTimestamp = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    Deidentifier(KEY).apply(ds)
    item = ds.VerifyingObserverSequence[0]
    assert (str(item.VerifyingObserverName), item.VerifyingOrganization) == ("ANONYMIZED", "ANONYMIZED")
    assert item.VerificationDateTime == "19000101000000"
    assert len(item.VerifyingObserverIdentificationCodeSequence) == 0
    assert ds.FrameOriginTimestamp == b"\x00\x00"


def test_uids_remapped_in_every_form() -> None:
    """Guards against: a NUL padding a value of a multi-valued UI (some writers pad each value; pydicom strips
    only the last one's) remapped as part of the UID, so the reference no longer matches; an empty UID
    remapped; a dataset without SOP Instance UID keeping its file meta's original; the study's map key not
    the UID the objects carry (with and without Retain UIDs); a study entry made up for a dataset without
    Study Instance UID.
    """
    from pydicom.dataelem import RawDataElement

    ds = _dataset()
    value = b"1.2.3.5\x00\\1.2.3.6\x00"  # Irradiation Event UID (VM 1-n), each value NUL-padded
    ds._dict[0x00083010] = RawDataElement(0x00083010, "UI", len(value), value, 0, False, True)
    ds.add_new(0x00209161, "UI", "")  # Concatenation UID, present without a value
    del ds.SOPInstanceUID
    m = Deidentifier(KEY).apply(ds)
    assert list(ds.IrradiationEventUID) == [KEY.uid("1.2.3.5"), KEY.uid("1.2.3.6")]
    assert ds.ConcatenationUID == "" and ds.file_meta.MediaStorageSOPInstanceUID == KEY.uid("1.2.3.4.5.6.7")
    assert m.uids[KEY.uid("1.2.3.4.5.6.7")] == "1.2.3.4.5.6.7" and m.study[0] == ds.StudyInstanceUID == KEY.uid("1.2.3.4")
    ds = _dataset()
    m = Deidentifier(KEY, ProfileOptions(retain_uids=True)).apply(ds)
    assert m.study[0] == ds.StudyInstanceUID == "1.2.3.4" and m.uids == {}
    ds = _dataset()
    del ds.StudyInstanceUID
    assert Deidentifier(KEY).apply(ds).study is None


def test_markers_name_every_option() -> None:
    """De-identification Method: "medpipe deid" and the profile with every option, cut to LO's 64 characters
    (PS3.5); guards against another text or length."""
    ds = _dataset()
    opts = ProfileOptions(retain_modified_dates=True, clean_descriptors=True, retain_device_identity=True,
                          retain_institution_identity=True, retain_patient_characteristics=True,
                          retain_safe_private=True)
    Deidentifier(KEY, opts).apply(ds)
    assert list(ds.DeidentificationMethod) == [
        "medpipe deid", "PS3.15 E.1-1 Basic Profile +SafePriv +DevId +InstId +PatChars +M"]


def test_timezone_offset_kept_with_modified_dates() -> None:
    """Retain Modified Dates keeps Timezone Offset From UTC, as it keeps times: a whole-day shift leaves both
    valid. It was cleaned as text with the dataset's identifiers, and a removed date-time carrying the same
    offset (GPS Time Stamp "...+0100", X) made it "+" (an invalid offset) under Clean Descriptors.
    """
    ds = _dataset()
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.GPSTimeStamp = "20240311093015+0100"
    Deidentifier(KEY, ProfileOptions(retain_modified_dates=True, clean_descriptors=True)).apply(ds)
    assert ds.TimezoneOffsetFromUTC == "+0100" and "GPSTimeStamp" not in ds


def test_nothing_is_left_behind_by_the_walk() -> None:
    """Guards against elements the walk skips or stops at: a private element in the reserved range
    (gggg,0100-0FFF) or at element 00 of a block ((0029,1000)) kept (a PHI leak: it was, for the reserved
    range); private and public group lengths, Data Set Trailing Padding, a private creator of block FF or an
    attribute of Table E.1-1 that pydicom does not know ((0010,0011), X) kept; the walk stopping after one of
    them (Patient ID then left as it was).
    """
    ds = _dataset()
    ds.add_new(0x00080000, "UL", 200)  # group length
    ds.add_new(0x00100011, "LO", "Johnny")  # a Table E.1-1 row (X) newer than pydicom 3.0's dictionary
    ds.add_new(0x00290000, "UL", 100)  # private group length
    ds.add_new(0x00290100, "LO", "John Smith")  # reserved range of a private group
    ds.add_new(0x00291000, "LO", "Smith")  # element 00 of the CSA block
    ds.add_new(0x002900FF, "LO", "ACME 1.0")
    ds.add_new(0x0029FF01, "LO", "John")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)
    Deidentifier(KEY).apply(ds)
    assert ds.PatientID == KEY.patient_pseudonym("MRN-42", "")
    assert not [e.tag for e in ds if e.tag.is_private or e.tag.element == 0 or e.tag in (0x00100011, 0xFFFCFFFC)]


def test_combined_codes_and_dummies_at_the_top_and_nested() -> None:
    """X resolved by the IOD: Responsible Person (X, Type 2 in the MR Image IOD) emptied, not removed; in an
    item: a Referenced Study Sequence (X/Z) inside Request Attributes (C under Clean Descriptors) removed, a
    Patient ID (Z/D) given the pseudonym; Annotation Group UID (D, a UI) remapped like any UID.

    Guards against: X not resolved, or resolved without the attribute's tag; a nested sequence emptied
    instead of removed; a nested Patient ID emptied; a UI dummied (there is no UI dummy) instead of remapped.
    """
    ds = _dataset()
    ds.ResponsiblePerson = "Doe^Jane"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    request = Dataset()
    request.RequestedProcedureDescription = "MR brain"
    request.ReferencedStudySequence = Sequence([ref])
    ds.RequestAttributesSequence = Sequence([request])
    group = Dataset()
    group.PatientID = "MRN-42"
    ds.SourcePatientGroupIdentificationSequence = Sequence([group])
    ds.AnnotationGroupUID = "1.2.3.7"
    Deidentifier(KEY, ProfileOptions(clean_descriptors=True)).apply(ds)
    assert "ResponsiblePerson" in ds and ds["ResponsiblePerson"].is_empty
    assert "ReferencedStudySequence" not in ds.RequestAttributesSequence[0]
    assert ds.SourcePatientGroupIdentificationSequence[0].PatientID == KEY.patient_pseudonym("MRN-42", "")
    assert ds.AnnotationGroupUID == KEY.uid("1.2.3.7")


def test_overlay_groups() -> None:
    """An overlay loses its whole group only when its Overlay Data goes: guards against the last overlay group
    (601E) missed, and a group without Overlay Data (only comments, X) removed whole."""
    ds = _dataset()
    for group in (0x601E, 0x6004):
        ds.add_new((group, 0x0010), "US", 16)
        ds.add_new((group, 0x4000), "LT", "marked by Dr Who")  # Overlay Comments, X
    ds.add_new((0x601E, 0x3000), "OW", b"\x01\x00" * 16)
    Deidentifier(KEY).apply(ds)
    assert [e.tag for e in ds if e.tag.group in (0x601E, 0x6004)] == [0x60040010]


def test_method_codes_and_temporal_marker() -> None:
    """De-identification Method Code Sequence items are CID 7050 codes (scheme DCM); Longitudinal Temporal
    Information Modified is UNMODIFIED under Retain Full Dates. Guards against another scheme, an empty
    meaning, another marker text."""
    ds = _dataset()
    Deidentifier(KEY, ProfileOptions(retain_full_dates=True)).apply(ds)
    assert [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in ds.DeidentificationMethodCodeSequence] == [
        ("113100", "DCM", "Basic Application Confidentiality Profile"),
        ("113106", "DCM", "Retain Longitudinal Temporal Information Full Dates Option")]
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_file_meta_rebuilt_from_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file meta follows the de-identified dataset (its SOP Class and new SOP Instance UID), falls back on
    the old file meta where the dataset lacks them, and names medpipe in 16 characters (SH).

    Guards against: the old file meta's values preferred to the dataset's (a copy whose meta disagrees),
    the fallbacks lost, the meta's instance UID left original or made up, a longer version name.
    """
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    import medpipe

    ds = _dataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # disagrees with the dataset's
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.99"
    monkeypatch.setattr(medpipe, "__version__", "1.2.3.dev45+g1234567")
    Deidentifier(KEY).apply(ds)
    meta = ds.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (
        "1.2.840.10008.5.1.4.1.1.4", KEY.uid("1.2.3.4.5.6.7"))
    assert meta.ImplementationVersionName == "MEDPIPE_1.2.3.de"
    assert (meta.TransferSyntaxUID, meta.ImplementationClassUID) == ("1.2.840.10008.1.2.1", PYDICOM_IMPLEMENTATION_UID)
    ds = _dataset()
    del ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID
    Deidentifier(KEY).apply(ds)
    assert (ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID) == (
        "1.2.840.10008.5.1.4.1.1.4", "")
    ds = _dataset()
    del ds.SOPClassUID, ds.file_meta  # a dataset made in memory: no file meta at all
    Deidentifier(KEY).apply(ds)
    assert ds.file_meta.MediaStorageSOPClassUID == "" and "TransferSyntaxUID" not in ds.file_meta
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == KEY.uid("1.2.3.4.5.6.7")


def test_values_read_from_a_file_count_as_values() -> None:
    """Where the IOD does not say (an unknown SOP Class), a combined code gives D for an attribute with a
    value, Z for one without, also when the element is still raw bytes from the file. Guards against raw
    elements taken for empty (Station Name emptied instead of dummied)."""
    from io import BytesIO

    import pydicom
    from pydicom.filewriter import dcmwrite

    ds = _dataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4.99"  # a SOP Class the table does not know
    ds.StationName = "MRSCAN-ZETA7"  # X/Z/D
    ds.OperatorsName = ""  # X/Z/D, no value
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    ds = pydicom.dcmread(buf)
    Deidentifier(KEY).apply(ds)
    assert ds.StationName == "ANONYMIZED" and ds["OperatorsName"].is_empty


def test_table_details() -> None:
    """Guards against: the private row's code other than X without Retain Safe Private; option names not read
    (dashes, spaces) or not set; a Type other than 3 for an attribute the IOD lists as optional; the
    unknown-option message changed (a user sees it)."""
    t = ActionTable()
    assert t.private_action == "X"
    assert ProfileOptions.from_names(["retain-modified-dates", " clean_descriptors "]) == ProfileOptions(
        retain_modified_dates=True, clean_descriptors=True)  # dashes or underscores, spaces around
    assert t.iod_type(0x00081010, "1.2.840.10008.5.1.4.1.1.2") == "3"  # Station Name in CT Image
    with pytest.raises(ConfigError, match=r"^unknown profile option 'retain-names'; choose from retain-safe-private, "
                                          r"retain-uids, retain-device-identity, retain-institution-identity, "
                                          r"retain-patient-characteristics, retain-full-dates, retain-modified-dates, "
                                          r"clean-descriptors$"):
        ProfileOptions.from_names(["retain-names"])


def test_safe_private_element_in_the_last_block() -> None:
    """A kept safe attribute in block FF ((0019,FF0C) under creator (0019,00FF)) keeps its creator; guards
    against the last creator slot taken for something else and removed (the b-value left without owner)."""
    ds = _dataset()
    ds.add_new(0x001900FF, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x0019FF0C, "IS", "500")
    Deidentifier(KEY, ProfileOptions(retain_safe_private=True)).apply(ds)
    assert {e.tag for e in ds if e.tag.is_private} == {0x00190010, 0x0019100C, 0x001900FF, 0x0019FF0C}


def test_combined_codes_every_type() -> None:
    """ActionTable.resolve for each Type the IOD data gives (the Types read from PS3.3 by make_table.py):
    Type 1 needs a value (D), Type 2 an element (Z, else D), Type 3 allows removal (X, else Z); X is kept
    unless the IOD requires the attribute; inside sequences (no IOD Type) D where there is a value.

    Guards against: a Type 1 X attribute (Timezone Offset From UTC in the Simplified Adult Echo SR) removed; a
    Type 2 X/D attribute (First Treatment Date of an RT Beams Treatment Record) emptied; a Type 3 Z/D (Content
    Date of a GSPS) dummied; the IOD's Type applied inside sequences; a non-sequence X/Z inside a sequence
    removed, or an X/Z at the top level of an unknown IOD.
    """
    t = ActionTable()
    echo_sr, rt_record = "1.2.840.10008.5.1.4.1.1.88.72", "1.2.840.10008.5.1.4.1.1.481.4"
    gsps, ct, unknown = "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    assert t.resolve("X", 0x00080201, echo_sr, True, True) == "D"
    assert t.resolve("X/D", 0x30080054, rt_record, True, True) == "D"
    assert t.resolve("Z/D", 0x00080023, gsps, True, True) == "Z"
    assert t.resolve("X", 0x00102297, ct, False, True) == "X"  # Responsible Person inside a sequence
    assert t.resolve("X/Z/D", 0x00081010, ct, False, True) == "D"  # Station Name inside a sequence
    assert t.resolve("X/Z", 0x00080022, ct, False, True) == "Z"  # Acquisition Date inside a sequence
    assert t.resolve("X/Z", 0x00080022, unknown, True, True, is_sequence=False) == "Z"


def test_map_merge_and_option_precedence(tmp_path: Path) -> None:
    """merge_into_map writes a version-1 map of this key, merges later runs into it, refuses another key's map;
    _apply_options: K beats C beats the basic code (Table E.1-1 with several options), else the option's code.

    Guards against: a map merged whatever key made it, another version, file references lost; the precedence
    of K and C lost; the two-option message changed (a user sees it).
    """
    import json

    from medpipe.deid.mapping import MapBuilder, merge_into_map, read_map
    from medpipe.deid.table import _apply_options

    path = tmp_path / "site.map.json"
    first, second = MapBuilder(), MapBuilder()
    first.add_file("F1", "a/b.dcm")
    second.add_file("F2", "c.dcm")
    merge_into_map(path, KEY.key_id, first)
    merge_into_map(path, KEY.key_id, second)
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["key_id"]) == ("medpipe-deid-map", 1, KEY.key_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # private: it links pseudonyms to patients
    assert read_map(path, KEY.key_id)["files"] == {"F1": "a/b.dcm", "F2": "c.dcm"}
    with pytest.raises(ConfigError, match="this map was made with another key"):
        merge_into_map(path, OTHER_KEY.key_id, first)
    assert _apply_options("X", {"a": "C", "b": "K"}, ("a", "b")) == "K"
    assert _apply_options("X", {"a": "C", "b": "X"}, ("b", "a")) == "C"
    assert _apply_options("Z", {"a": "X"}, ("a",)) == "X" and _apply_options("Z", {"a": "X"}, ()) == "Z"
    with pytest.raises(ConfigError, match=r"^choose one of the Retain Longitudinal options: full dates or modified "
                                          r"dates, not both$"):
        ProfileOptions(retain_full_dates=True, retain_modified_dates=True)


def test_key_file_in_new_folders_of_32_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "site" / "keys" / "site.key"  # two folders that do not exist yet
    key, created = load_or_create_key(path)
    header, secret = path.read_text(encoding="utf-8").splitlines()
    assert created and header == "medpipe-deid-key v1"
    assert len(bytes.fromhex(secret)) == 32  # 256 bits, the HMAC-SHA256 block's worth
    assert key.key_id == DeidKey(bytes.fromhex(secret)).key_id


def test_key_file_readable_by_others_is_used_with_a_warning(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "site.key"
    key, _ = load_or_create_key(path)
    path.chmod(0o640)  # the group may read it: a leak of every pseudonym's key
    with caplog.at_level("WARNING", logger="medpipe.deid.keys"):
        again, created = load_or_create_key(path)
    assert not created and again.key_id == key.key_id
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("medpipe.deid.keys", f"{path}: key file is readable by others (mode 640); chmod 600 it")]
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="medpipe.deid.keys"):
        load_or_create_key(path)
    assert caplog.records == []


def test_key_created_meanwhile_by_another_process_is_read_not_overwritten(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # two runs start together: both see no key file, one creates it first; the other must read that key
    # (O_EXCL refuses to overwrite it) and say it did not create it
    path = tmp_path / "site.key"
    first, _ = load_or_create_key(path)
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: False if self == path else real_exists(self, *a, **k))
    second, created = load_or_create_key(path)
    assert not created and second.key_id == first.key_id


# -- re-identification of one object ------------------------------------------------------------


def _deidentified(tmp_path: Path, originals: dict[str, Dataset],
                  patients: dict[str, Pseudonym] | None = None) -> tuple[Path, Path, dict[str, Dataset]]:
    """``originals`` (file name -> dataset) de-identified with KEY: the key file, the map, the results
    (file name -> the de-identified dataset, as a model's result made on it would carry them)."""
    from medpipe.deid.keys import HEADER
    from medpipe.deid.mapping import MapBuilder, merge_into_map

    key_path = tmp_path / "site.key"
    key_path.write_text(f"{HEADER}\n{bytes(range(32)).hex()}\n")
    builder, results = MapBuilder(), {}
    for name, ds in originals.items():
        ds = copy.deepcopy(ds)
        builder.add(Deidentifier(KEY, patient_map=patients).apply(ds))
        results[name] = ds
    return key_path, merge_into_map(tmp_path / "site.map.json", KEY.key_id, builder), results


def _write(folder: Path, results: dict[str, Dataset]) -> Path:
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    for name, ds in results.items():
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
    return folder


def test_reidentify_puts_the_original_patient_and_study_back(tmp_path: Path) -> None:
    """One result re-identified, given as its folder and as the file itself: the original UIDs, Patient and
    General Study attributes back, markers gone, at OUT/<PatientID>/<StudyInstanceUID>/<Modality>_<SOP>.dcm.

    Guards against: a single result file not accepted as the input; a study attribute the original lacked
    crashing the run; a Patient attribute the original lacked left with a value; the Study Instance UID
    taken from the map's study entry (not checked against the key) instead of the checked UID pair; the
    report not naming the output folder.
    """
    import json

    import pydicom

    from medpipe.deid.reidentify import reidentify

    original = _dataset()
    del original.PatientSex  # the original has no Patient's Sex (nor Accession Number, Study ID...)
    key_path, map_path, results = _deidentified(tmp_path, {"seg.dcm": original})
    results["seg.dcm"].PatientSex = "O"  # a result's writer filled in what the original lacked
    folder = _write(tmp_path / "results", results)
    doc = json.loads(map_path.read_text())
    doc["studies"][KEY.uid("1.2.3.4")]["StudyInstanceUID"] = "9.9.9"  # an edited study entry: not used
    map_path.write_text(json.dumps(doc))
    expected = "MRN-42/1.2.3.4/MR_1.2.3.4.5.6.7.dcm"
    for source, out in ((folder, tmp_path / "out"), (folder / "seg.dcm", tmp_path / "out_file")):
        report = reidentify(source, out, key_path, map_path)
        assert (report.out, report.written, report.rejected) == (out.resolve(), [expected], [])
        ds = pydicom.dcmread(out / expected)
        assert (ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientAge) == (
            "MRN-42", "Smith^John", "19600312", "064Y")
        assert "PatientSex" in ds and ds.PatientSex == ""
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
            "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6.7")
        assert (ds.StudyDate, ds.StudyTime) == ("20240311", "101500") and "AccessionNumber" not in ds
        assert not any(kw in ds for kw in ("PatientIdentityRemoved", "DeidentificationMethod",
                                           "DeidentificationMethodCodeSequence",
                                           "LongitudinalTemporalInformationModified"))
        assert not (out / "rejected.csv").exists()


def test_reidentify_without_patient_id_name_or_modality(tmp_path: Path) -> None:
    """An original without Patient ID and Name (known by its birth date) and a result without Modality:
    the pseudonymous ID and name are emptied, not kept; the file is unknown/<study>/OBJ_<SOP>.dcm.

    Guards against: the pseudonymous Patient ID or Name sent to the PACS as the patient's (the bug fixed
    here); the stand-ins for an empty Patient ID and a missing Modality in the output path changed.
    """
    import pydicom

    from medpipe.deid.reidentify import reidentify

    original = _dataset()
    del original.PatientID, original.PatientName
    key_path, map_path, results = _deidentified(tmp_path, {"sr.dcm": original})
    assert results["sr.dcm"].PatientID.startswith("P")  # the de-identified object has a pseudonymous ID and name
    del results["sr.dcm"].Modality
    report = reidentify(_write(tmp_path / "results", results), tmp_path / "out", key_path, map_path)
    assert report.written == ["unknown/1.2.3.4/OBJ_1.2.3.4.5.6.7.dcm"] and report.rejected == []
    ds = pydicom.dcmread(tmp_path / "out" / report.written[0])
    assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate) == ("", "", "19600312")


def test_reidentify_rejections_and_messages(tmp_path: Path) -> None:
    """Each result that cannot be re-identified gets one line in rejected.csv and the rest are written; a
    missing or empty RESULTS is a one-line error naming it.

    Guards against: a result without SOP Instance UID crashing the run (AttributeError: the bug fixed here);
    a result without Patient ID matched to a patient through a stand-in value (here a user's pseudonym
    "XXXX"); a rejected single-file input named by anything but its file name; the messages changed.
    """
    import csv
    import re

    from medpipe.deid.reidentify import reidentify
    from medpipe.errors import SourceError

    key_path, map_path, results = _deidentified(tmp_path, {"ok.dcm": _dataset()},
                                                patients={"MRN-42": Pseudonym("XXXX")})
    no_uid, no_pid = copy.deepcopy(results["ok.dcm"]), copy.deepcopy(results["ok.dcm"])
    del no_uid.SOPInstanceUID
    del no_pid.PatientID
    # ok.dcm comes last: every rejection goes on with the next file
    folder = _write(tmp_path / "results", {"ok.dcm": results["ok.dcm"], "no_uid.dcm": no_uid, "no_pid.dcm": no_pid})
    (folder / "notes.txt").write_text("not DICOM, not .dcm: skipped")
    (folder / "broken.dcm").write_bytes(b"not DICOM")
    report = reidentify(folder, tmp_path / "out", key_path, map_path)
    assert report.written == ["MRN-42/1.2.3.4/MR_1.2.3.4.5.6.7.dcm"]
    not_in_map = "its patient is not in the map (not made on data de-identified with this map)"
    expected = [("broken.dcm", "not a readable DICOM file"), ("no_pid.dcm", not_in_map),
                ("no_uid.dcm", "no SOP Instance UID")]
    assert report.rejected == expected
    with open(tmp_path / "out" / "rejected.csv", newline="") as fh:
        assert [(r["path"], r["reason"]) for r in csv.DictReader(fh)] == expected
    single = reidentify(folder / "no_pid.dcm", tmp_path / "out_single", key_path, map_path)
    assert (single.written, single.rejected) == ([], [expected[1]])
    missing, empty = tmp_path / "none", tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=rf"^{re.escape(str(missing))}: no such file or folder$"):
        reidentify(missing, tmp_path / "o1", key_path, map_path)
    with pytest.raises(SourceError, match=rf"^{re.escape(str(empty))}: no files found$"):
        reidentify(empty, tmp_path / "o2", key_path, map_path)


# -- burned-in text ------------------------------------------------------------------------------


def test_burned_in_header_rule() -> None:
    """burned_in_reason on hand-made headers (PS3.3 C.7.6.1.1.6 Burned In Annotation; PS3.4 SOP classes).

    Guards against: an image without pixel data quarantined, or one with only Float / Double Float Pixel Data
    not; YES / NO read with case or spaces mattering; secondary capture, SC / OT or ultrasound images let
    through without an explicit NO (by SOP class or by Modality, in any case); other images quarantined;
    the reasons (a user reads them in rejected.csv) changed.
    """
    from medpipe.deid.burned_in import burned_in_reason

    def image(pixels: str = "PixelData", **attrs: str) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.Modality = "CT"
        setattr(ds, pixels, b"\x00\x00")
        for k, v in attrs.items():
            setattr(ds, k, v)
        return ds

    yes = "burned-in annotation: Burned In Annotation is YES"
    sc = "possible burned-in text: secondary capture without Burned In Annotation NO"
    us = "possible burned-in text: ultrasound image without Burned In Annotation NO"
    no_pixels = Dataset()
    no_pixels.BurnedInAnnotation = "YES"
    no_pixels.Modality = "US"
    assert burned_in_reason(no_pixels) is None
    for pixels in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        assert burned_in_reason(image(pixels, BurnedInAnnotation="YES")) == yes
    assert burned_in_reason(image(BurnedInAnnotation=" yes ")) == yes
    assert burned_in_reason(image()) is None and burned_in_reason(image(BurnedInAnnotation="NO")) is None
    for uid in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
                "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"):  # the five SC Image Storage classes
        assert burned_in_reason(image(SOPClassUID=uid)) == sc
        assert burned_in_reason(image(SOPClassUID=uid, BurnedInAnnotation="no ")) is None
    for uid in ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.6.2",
                "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3"):  # US, US multi-frame, Enhanced US
        assert burned_in_reason(image(SOPClassUID=uid)) == us  # volume, and the two retired ones
    assert burned_in_reason(image(SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT")) == sc
    assert burned_in_reason(image(Modality="sc")) == ("possible burned-in text: SC image without Burned In "
                                                      "Annotation NO")
    assert burned_in_reason(image(Modality="OT")) == "possible burned-in text: OT image without Burned In Annotation NO"
    assert burned_in_reason(image(Modality="us")) == us
    assert burned_in_reason(image(Modality="US", BurnedInAnnotation="NO")) is None


def _pixels(arr: np.ndarray, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.set_pixel_data(arr, photometric, 8 * arr.itemsize)
    return ds


#: a ramp 0..249 over 2 x 1000 pixels (each value 8 times): its 0.5th percentile (index 9.995 of 2000 sorted
#: values) is 1 and its 99.5th (index 1989.005) is 248, so the 8-bit frame is clip((v - 1) / 247) * 255
RAMP = (np.arange(2000) // 8).astype(np.uint8).reshape(2, 1000)
RAMP_8BIT = (np.clip((RAMP - 1.0) / 247.0, 0, 1) * 255).astype(np.uint8)


def _png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_pixel_check_frame_scaling() -> None:
    """_frame_png, the image Tesseract reads, on hand-made frames with the expected 8-bit image derived above.

    Guards against: another percentile window or scale; MONOCHROME1 not inverted (dark text on light); a
    multi-frame image read from another frame; colour not averaged over R, G, B; YBR not converted to RGB
    first; small images not enlarged to >= 1000 pixels wide (by a whole factor), wide ones changed; a flat
    image sent to Tesseract; pixel data that is not a 2-D frame read as "no text" (now an error).
    """
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    from medpipe.deid.burned_in import _frame_png

    def frame(ds: Dataset) -> np.ndarray:
        png = _frame_png(ds)
        assert png is not None
        return _png(png)

    assert np.array_equal(frame(_pixels(RAMP)), RAMP_8BIT)
    assert np.array_equal(frame(_pixels(RAMP, "MONOCHROME1")), 255 - RAMP_8BIT)
    assert np.array_equal(frame(_pixels(np.stack([RAMP, 255 - RAMP]))), RAMP_8BIT)  # frame 0 only
    zero_frames = _pixels(RAMP)
    zero_frames.NumberOfFrames = 0  # invalid: pydicom reads one frame, and so does the check
    with pytest.warns(UserWarning, match="assuming 1 frame"):
        assert np.array_equal(frame(zero_frames), RAMP_8BIT)
    rgb = np.stack([RAMP, RAMP, RAMP], axis=-1)
    rgb[RAMP >= 3, 0] += 3
    rgb[RAMP >= 3, 1] -= 3  # R, G, B average to the ramp
    assert np.array_equal(frame(_pixels(rgb, "RGB")), RAMP_8BIT)
    assert np.array_equal(frame(_pixels(np.stack([rgb, rgb[:, ::-1]]), "RGB")), RAMP_8BIT)  # colour, 2 frames
    grey_ybr = np.stack([RAMP, np.full_like(RAMP, 128), np.full_like(RAMP, 128)], axis=-1)  # Y, Cb, Cr: grey
    assert np.array_equal(frame(_pixels(grey_ybr, "YBR_FULL")), RAMP_8BIT)
    # real files: pydicom's test image in RGB and in YBR_FULL gives the same frame, up to the colour conversion's
    # rounding (converted twice, as before, the grey levels were off by up to 84)
    rgb_file, ybr_file = (frame(pydicom.dcmread(get_testdata_file(name))).astype(int)
                          for name in ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm"))
    assert rgb_file.shape == (1000, 1000) and np.abs(rgb_file - ybr_file).max() <= 3
    for width, shown in ((10, 1000), (400, 800), (600, 1200), (999, 999), (1000, 1000), (1500, 1500)):
        assert frame(_pixels(np.tile(RAMP, 2)[:, :width].copy())).shape == (2 * shown // width, shown)
    # 2 x 10 of 0 / 200 (8-bit: 0 / 255, half each) enlarged 100 times with Lanczos (sharp edges for Tesseract)
    checks = (np.indices((2, 10)).sum(axis=0) % 2 * 200).astype(np.uint8)
    lanczos = Image.fromarray((checks // 200 * 255).astype(np.uint8)).resize((1000, 200), Image.Resampling.LANCZOS)
    assert np.array_equal(frame(_pixels(checks)), np.asarray(lanczos))
    assert _frame_png(_pixels(np.full((4, 4), 7, np.uint8))) is None
    assert _frame_png(_pixels(np.full((1, 1), 7, np.uint8))) is None  # one pixel: flat too
    excess = _pixels(np.stack([RAMP, RAMP]))
    excess.NumberOfFrames = 1  # more pixel data than Number of Frames says: pydicom gives every frame
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"^the first frame is not a 2-D image "
                                                                     r"\(pixel array of shape \(2, 2, 1000\)\)$"):
        _frame_png(excess)


def _fake_tesseract(folder: Path, tsv: str, exit_code: int = 0, langs: str = "eng\nosd") -> Path:
    """A ``tesseract`` stand-in that lists ``langs`` (as tesseract 5 does: on stdout, after a header line), and
    otherwise records its arguments and input and prints ``tsv``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out.tsv").write_text(tsv, encoding="latin-1")
    count = len(langs.split())  # a tessdata folder whose name is not UTF-8 (Latin-1 bytes)
    (folder / "langs.txt").write_text(f'List of available languages in "{folder}/José/" ({count}):\n{langs}\n',
                                      encoding="latin-1")
    exe = folder / "tesseract"
    exe.write_text(f'#!/bin/sh\nif [ "$1" = "--list-langs" ]; then cat "{folder}/langs.txt"; exit {exit_code}; fi\n'
                   f'echo "$@" > "{folder}/args"\ncat > "{folder}/input.png"\n'
                   f'cat "{folder}/out.tsv"\nexit {exit_code}\n')
    exe.chmod(0o755)
    return exe


def test_pixel_check_reads_tesseract_tsv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pixel_text / ocr_reason / tesseract_path with a stand-in tesseract printing hand-written TSV (12 columns:
    level ... conf text).

    Guards against: the header or short / unparsable rows counted; the confidence bound (60, inclusive) or the
    word length (3 letters or digits after dropping the rest) changed; undecodable bytes breaking the parse;
    other tesseract arguments (sparse text, English, TSV on stdout) or another image than the frame; the word
    count that flags an image (2) or its reason changed; a failing tesseract read as "no text"; a hanging one
    not stopped; a flat image sent to it; the missing-command message lost; a tesseract without English data
    accepted (every image would then fail the check, one by one).
    """
    import re
    import shutil
    import subprocess

    from medpipe.deid import burned_in
    from medpipe.deid.burned_in import _frame_png, ocr_reason, pixel_text, tesseract_path

    head = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
    row = "5\t1\t1\t1\t1\t1\t10\t10\t50\t20\t{}\t{}\n"
    short = "5\t1\t1\t1\t1\t1\t10\t10\t50\t20\t99\n"  # 11 columns
    tsv = head + short + "".join(row.format(c, t) for c, t in (
        ("60", "DOE"), ("59.99", "JOHN"), ("96.5", "AB"), ("x", "MARY"), ("91", "A-B-C"), ("-1", ""),
        ("88", "12/04"), ("75", "M\xffRY")))
    exe = _fake_tesseract(tmp_path / "t", tsv)
    image = _pixels(RAMP)
    assert pixel_text(image, str(exe)) == ["DOE", "ABC", "1204", "MRY"]
    assert (tmp_path / "t" / "args").read_text() == "stdin stdout --psm 11 -l eng tsv\n"
    assert (tmp_path / "t" / "input.png").read_bytes() == _frame_png(image)
    assert ocr_reason(image, str(exe)) == "pixel text check: Tesseract read 4 words in the image"
    one = _fake_tesseract(tmp_path / "one", head + row.format("90", "DOE"))
    assert ocr_reason(image, str(one)) is None
    two = _fake_tesseract(tmp_path / "two", head + row.format("90", "DOE") + row.format("90", "JOHN"))
    assert ocr_reason(image, str(two)) == "pixel text check: Tesseract read 2 words in the image"
    monkeypatch.setattr(shutil, "which", lambda name: str(two) if name == "tesseract" else None)
    assert tesseract_path() == str(two) and pixel_text(image) == ["DOE", "JOHN"]  # found on the PATH
    failing = _fake_tesseract(tmp_path / "failing", head + row.format("90", "DOE"), exit_code=1)
    with pytest.raises(subprocess.CalledProcessError):
        pixel_text(image, str(failing))
    unused = _fake_tesseract(tmp_path / "unused", head + row.format("90", "DOE") + row.format("90", "JOHN"))
    assert pixel_text(_pixels(np.full((4, 4), 7, np.uint8)), str(unused)) == []  # flat: tesseract not run
    assert not (tmp_path / "unused" / "args").exists()
    hanging = _fake_tesseract(tmp_path / "hanging", "")
    hanging.write_text("#!/bin/sh\nexec sleep 5\n")
    monkeypatch.setattr(burned_in, "TESSERACT_TIMEOUT_S", 0.5)
    with pytest.raises(subprocess.TimeoutExpired):
        pixel_text(image, str(hanging))
    for no_eng, code in ((tmp_path / "no_eng", 0), (tmp_path / "no_eng_failing", 1)):
        exe = _fake_tesseract(no_eng, "", exit_code=code, langs="deu\nenm\nosd")  # German, Middle English
        monkeypatch.setattr(shutil, "which", lambda name, exe=exe: str(exe) if name == "tesseract" else None)
        with pytest.raises(ConfigError, match=rf"^--ocr needs tesseract's English language data \('eng'\), "
                                              rf"which {re.escape(str(exe))} does not list$") as err:
            tesseract_path()
        assert err.value.hint == "apt-get install tesseract-ocr-eng (Debian/Ubuntu), or leave out --ocr"
    monkeypatch.setattr(shutil, "which", lambda name: str(hanging) if name == "tesseract" else None)
    with pytest.raises(subprocess.TimeoutExpired):  # --list-langs hangs too
        tesseract_path()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^--ocr needs the tesseract command, which is not installed$") as err:
        tesseract_path()
    assert err.value.hint == "apt-get install tesseract-ocr (Debian/Ubuntu), or leave out --ocr"


# -- the leak check (medpipe.deid.audit) -----------------------------------------------------------


def test_identifying_values_by_kind() -> None:
    """identifying_values on a hand-made dataset: each value below is picked (or not) by its kind alone.

    Guards against: names not split into their components, dates, instance UIDs (file meta and nested ones),
    private text or identifying attributes (every value of a multi-valued one) missed; class UIDs, well-known
    UIDs, private creators, private binary values, short values, runs of zeros / dots, code meanings or
    non-text VRs counted; padding (spaces, NUL) kept; free text not left out when asked.
    """
    from medpipe.deid.audit import identifying_values

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.99"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.FrameOfReferenceUID = "1.2.840.10008.1.4.1.1"  # well known (in pydicom's UID dictionary)
    ds.PatientName = "Smith^John=Jon"
    ds.PatientID = " MRN-42X\x00"
    ds.IssuerOfPatientID = "Issuer A \x00"
    ds.OtherPatientIDs = ["ID-0001", "ID-0002"]
    ds.PatientBirthDate = "19600312"
    ds.AcquisitionDateTime = "20240311101500"
    ds.StudyID = "0000"  # only zeros: no identifier
    ds.AccessionNumber = "0.0-0"
    ds.StationName = "00 00"
    ds.InstitutionName = "St. Elsewhere"
    ds.PatientComments = "Seen by Dr Who"
    ds.ReasonForStudy = "Headache"  # the same as a code meaning below: terminology
    ds.SeriesDescription = "FLAIR axial"  # not an identifying attribute
    ds.add_new(0x00181000, "LO", None)  # Device Serial Number present without a value
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.77"
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.CodeMeaning = "Headache "
    ds.ReferencedImageSequence = Sequence([item])
    block = ds.private_block(0x0019, "ACME NOTES", create=True)
    block.add_new(0x10, "LO", "Zanzibar note")
    block.add_new(0x11, "OB", b"Binary Person")
    ds.PerformedProcedureStepID = "PPS-77"  # (0040,0253): after the private group
    expected = {"1.2.3.99", "1.2.3.4.5", "1.2.3.77", "Smith", "John", "MRN-42X", "Issuer A", "ID-0001", "ID-0002",
                "19600312", "20240311101500", "St. Elsewhere", "Seen by Dr Who", "Zanzibar note", "PPS-77"}
    assert identifying_values(ds) == expected
    assert identifying_values(ds, free_text=False) == expected - {"Seen by Dr Who"}
    assert identifying_values(ds, min_length=3) == expected | {"Jon"}
    ds.file_meta = FileMetaDataset()  # no Media Storage SOP Instance UID
    assert identifying_values(ds) == expected - {"1.2.3.99"}
    del ds.file_meta
    assert identifying_values(ds) == expected - {"1.2.3.99"}


def test_leaks_counts_whole_words_outside_the_pixel_data(tmp_path: Path) -> None:
    """leaks() on hand-made files: a value counts where it stands as a whole word, in Latin-1 or UTF-8, and
    inside pixel data only beyond the number of times it occurs there.

    Guards against: 'MARY' found in 'PRIMARY' or 'mary' in 'summary' / 'maryland'; a value in another encoding
    missed; bytes of the pixel data (integer or float) taken for a leak, or a value in the header hidden because
    it is also in the pixels; a file that is not DICOM, is truncated, or has no (or empty) pixel data not scanned
    in full; the result not sorted, or a value found in both encodings listed twice; a value that Latin-1 cannot
    encode breaking the scan.
    """
    from medpipe.deid.audit import leaks

    text = tmp_path / "report.csv"
    text.write_bytes("PRIMARY,Müller,Jones,Zoë,Renée\n".encode("latin-1") + "Zoë,Łukasz,xRenée".encode()
                     + b",MARYX,1234,summary,maryland\n")
    assert leaks(text, {"MARY", "mary", "Müller", "Zoë", "Łukasz", "Renée", "Jones", "1234", "123", "Absent"}) == [
        "1234", "Jones", "Müller", "Renée", "Zoë", "Łukasz"]  # Renée: inside a word in UTF-8, a word in Latin-1
    for tag, vr in ((0x7FE00010, "OB"), (0x7FE00008, "OF"), (0x7FE00009, "OD")):  # (Float / Double Float) Pixel Data
        ds = Dataset()
        ds.PatientComments = "Roe"
        ds.add_new(tag, vr, b" MRN7 Roe".ljust(16))  # "MRN7" only in the pixels; "Roe" in the header and the pixels
        out = tmp_path / f"{vr}.dcm"
        ds.save_as(out, implicit_vr=False, little_endian=True)
        assert leaks(out, {"MRN7", "Roe"}) == ["Roe"], vr
        assert leaks(out, {"MRN7"}) == [], vr
    # no pixels to set apart: every occurrence counts (any text, even one like a stand-in value)
    ds = Dataset()
    ds.PatientComments = "Roe XXXX"
    no_pixels = tmp_path / "no_pixels.dcm"
    ds.save_as(no_pixels, implicit_vr=False, little_endian=True)
    assert leaks(no_pixels, {"Roe", "XXXX"}) == ["Roe", "XXXX"]
    ds.add_new(0x7FE00010, "OB", b"")  # zero-length Pixel Data: pydicom reads its value as None
    empty = tmp_path / "empty_pixels.dcm"
    ds.save_as(empty, implicit_vr=False, little_endian=True)
    assert leaks(empty, {"Roe", "XXXX"}) == ["Roe", "XXXX"]
    ds.PixelData = b"Roe MRN7"
    ds["PixelData"].VR = "OB"
    ds.save_as(empty, implicit_vr=False, little_endian=True)
    truncated = tmp_path / "truncated.dcm"  # cut inside the Pixel Data element's 4-byte length: pydicom raises
    truncated.write_bytes(empty.read_bytes()[:-len(b"Roe MRN7") - 2])
    assert leaks(truncated, {"Roe", "XXXX"}) == ["Roe", "XXXX"]
