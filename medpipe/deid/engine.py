"""The table-driven engine: apply PS3.15 Table E.1-1 to one dataset, recursively, in place.

:class:`Deidentifier` walks every element of a dataset and of every sequence item inside it and acts
on it as :class:`~medpipe.deid.table.ActionTable` says (see that module for the codes):

* ``X`` remove; ``Z`` empty (a sequence loses its items); ``K`` keep (a sequence is walked);
* ``D`` a dummy value of the element's VR (a sequence is kept and walked; a UID is remapped);
  Patient ID's dummy is the keyed pseudonym, Patient's Name gets the pseudonymous name;
* ``U`` every UID in the value is remapped with the key (:meth:`DeidKey.uid`), except UIDs of the DICOM
  registry (well-known frames of reference, coding schemes...); ``X/Z/U*`` sequences are kept and walked,
  so their Referenced SOP Instance UIDs are remapped and references stay valid;
* ``C`` clean: dates (DA, DT) move by the patient's shift under Retain Longitudinal Temporal Information
  with Modified Dates (times are kept); text is cleaned of the identifying values found in the same
  dataset, of date-like strings and of runs of 5+ digits (Clean Descriptors, and the Retain Patient
  Characteristics rows marked C); a sequence is kept and walked; private attributes are kept only when
  on the safe list (Retain Safe Private) and numeric;
* combined codes are resolved by the attribute's Type in the IOD (:meth:`ActionTable.resolve`), and so
  is ``X`` where the IOD requires the attribute (it is then emptied, or dummied if Type 1).

Beyond the table, for the same reason the table exists: public attributes unknown to the data dictionary
are removed (nobody can say what they hold); group lengths and Data Set Trailing Padding are removed; an
overlay whose Overlay Data is removed loses its whole group (60xx), so no incomplete overlay remains; the
128-byte preamble is zeroed; file meta is rebuilt (no Source AE title, the new SOP Instance UID).

Then the PS3.15 markers are set: Patient Identity Removed ``YES``, De-identification Method (text) and
De-identification Method Code Sequence (CID 7050 codes of the profile and each option applied), and
Longitudinal Temporal Information Modified (``REMOVED`` / ``MODIFIED`` / ``UNMODIFIED``).

What the engine learns (original patient / study attributes, UID pairs) comes back as a
:class:`Mapping` for the private map file (:mod:`medpipe.deid.mapping`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR, repeater_has_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from medpipe.deid.keys import DeidKey
from medpipe.deid.safe_private import is_safe_private
from medpipe.deid.table import CID_7050, ActionTable, ProfileOptions

#: attributes of the Patient module kept in the map, to re-identify results later
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
    "PatientAge", "PatientBirthTime",
)
#: attributes of the General Study module kept in the map
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
    "StudyDescription",
)

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BYTES_WIDTH = {"OB": 2, "UN": 2, "OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0",
    "UR": "urn:x-anonymized", "AT": 0, "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0,
}
_PATIENT_ID = 0x00100020
_TRAILING_PADDING = 0xFFFCFFFC
_TIMEZONE_OFFSET = 0x00080201
_DATE_LIKE = re.compile(r"\b\d{1,4}[-./]\d{1,2}[-./]\d{1,4}\b|\b(?:19|20)\d{6}\b")
_LONG_DIGITS = re.compile(r"\d{5,}")


@dataclass
class Mapping:
    """What one dataset adds to the private map (original <-> pseudonym)."""

    patient: tuple[str, dict[str, Any]] | None = None  # pseudonymous Patient ID -> original patient attributes
    study: tuple[str, dict[str, Any]] | None = None  # pseudonymous Study Instance UID -> original study attributes
    uids: dict[str, str] = field(default_factory=dict)  # pseudonymous UID -> original UID


@dataclass(frozen=True)
class Pseudonym:
    """A user's choice for one patient (from a mapping CSV)."""

    patient_id: str
    patient_name: str = ""


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(_str(v) for v in value)
    return str(value)


def shift_date(value: str, days: int) -> str:
    """A DA value (``YYYYMMDD``; ``YYYY`` / ``YYYYMM`` keep their precision) moved by ``days``; '' if unreadable."""
    v = value.strip()
    if not v.isdigit() or len(v) not in (4, 6, 8):
        return ""
    try:
        d = dt.date(int(v[:4]), int(v[4:6] or 1), int(v[6:8] or 1)) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return d.strftime("%Y%m%d")[: len(v)]


def shift_datetime(value: str, days: int) -> str:
    """A DT value with its date part moved by ``days`` (time, fraction and offset kept); '' if unreadable."""
    v = value.strip()
    digits = len(v) - len(v.lstrip("0123456789"))
    head = v[: min(digits, 8)]
    if len(head) not in (4, 6, 8):
        return ""
    new = shift_date(head, days)
    return new + v[len(head):] if new else ""


class Deidentifier:
    """Applies the table to datasets with one key, one set of options and an optional patient mapping.

    ``patient_map``: original Patient ID -> :class:`Pseudonym` (a user's mapping CSV); patients not in it
    get the keyed pseudonym.
    """

    def __init__(self, key: DeidKey, options: ProfileOptions | None = None,
                 patient_map: MappingABC[str, Pseudonym] | None = None, table: ActionTable | None = None) -> None:
        self.key = key
        self.options = options or ProfileOptions()
        self.table = table or ActionTable(self.options)
        self.patient_map = dict(patient_map or {})
        self._private = self.table.private_action

    # -- identity --------------------------------------------------------------------------------

    def pseudonym(self, patient_id: str, issuer: str) -> Pseudonym:
        user = self.patient_map.get(patient_id)
        if user is not None:
            return Pseudonym(user.patient_id, user.patient_name or user.patient_id)
        p = self.key.patient_pseudonym(patient_id, issuer)
        return Pseudonym(p, p + "^")  # the name: one family-name component (the caret says so)

    def date_shift(self, patient_id: str, issuer: str) -> int:
        return self.key.date_shift_days(patient_id, issuer)

    # -- one dataset ------------------------------------------------------------------------------

    def apply(self, ds: Dataset) -> Mapping:
        """De-identify ``ds`` in place (file meta and preamble included); return what the map needs."""
        patient_id = _str(ds.get("PatientID"))  # absent: None, which _str makes ''
        issuer = _str(ds.get("IssuerOfPatientID"))
        if not patient_id:  # no ID: the name and birth date stand for the patient
            patient_id = "\x00" + _str(ds.get("PatientName")) + "\x00" + _str(ds.get("PatientBirthDate"))
        pseudo = self.pseudonym(patient_id, issuer)
        mapping = Mapping()
        original_patient = {k: _str(ds[k].value) for k in PATIENT_KEYWORDS if k in ds}
        original_study = {k: _str(ds[k].value) for k in STUDY_KEYWORDS if k in ds}
        ctx = _Context(
            sop_class=_str(ds.get("SOPClassUID")),
            pseudo=pseudo,
            shift=self.date_shift(patient_id, issuer) if self.options.retain_modified_dates else 0,
            uids=mapping.uids,
            # identifying values are collected before anything changes (only when text will be cleaned)
            identifiers=identifier_pattern(self._identifiers(ds)) if self._cleans_text() else None,
        )
        self._walk(ds, ctx, top_level=True)
        self._markers(ds, pseudo)
        self._file_meta(ds, ctx)
        original_patient["date_shift_days"] = ctx.shift
        mapping.patient = (pseudo.patient_id, original_patient)
        study_uid = _uid_text(original_study.get("StudyInstanceUID", ""))
        if study_uid:
            mapping.study = (self.key.uid(study_uid) if not self.options.retain_uids else study_uid,
                             {**original_study, "PatientID": pseudo.patient_id})
        return mapping

    def _cleans_text(self) -> bool:
        return self.options.clean_descriptors or self.options.retain_patient_characteristics

    def _identifiers(self, ds: Dataset) -> list[str]:
        """Identifying text of this dataset (values the profile removes), for cleaning descriptors."""
        found: set[str] = set()
        for elem in ds.iterall():
            if elem.VR not in _TEXT_VRS and elem.VR not in ("DA", "DT"):
                continue
            code = self.table.action(elem.tag)
            if code in (None, "K", "C") and not elem.tag.is_private:
                continue
            text = _str(elem.value)
            for part in re.split(r"[\^\\=]", text):
                part = part.strip()
                if len(part) >= 3:
                    found.add(part)
                    found.update(t for t in re.split(r"[^0-9A-Za-z]+", part) if len(t) >= 3)
        return list(found)  # identifier_pattern puts the longest first

    # -- the walk ---------------------------------------------------------------------------------

    def _walk(self, ds: Dataset, ctx: _Context, top_level: bool) -> None:
        elems = ds._dict
        private_keep: set[int] = set()  # private creator tags a kept private element needs
        overlay_groups: set[int] = set()
        for tag in sorted(elems):
            group = tag >> 16
            if group & 1:
                if self._private == "C" and (tag & 0xFFFF) >= 0x1000 and self._safe_private(ds, tag):
                    private_keep.add((tag & 0xFFFF0000) | ((tag >> 8) & 0xFF))
                    continue
                if not 0x10 <= (tag & 0xFFFF) <= 0xFF:  # all but the private creators, decided below
                    del elems[tag]
                continue
            if tag & 0xFFFF == 0 or tag == _TRAILING_PADDING:  # group length, trailing padding
                del elems[tag]
                continue
            code = self.table.action(tag)
            raw = elems[tag]
            vr = _vr(raw, tag)
            if code is None or code == "K":
                if vr is None and code is None:  # unknown public attribute: nobody can say what it holds
                    del elems[tag]
                elif vr == "SQ":
                    self._walk_items(ds, tag, ctx)
                continue
            if vr is None:
                del elems[tag]
                continue
            if code in ("X", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"):
                code = self.table.resolve(code, tag, ctx.sop_class, top_level, _has_value(raw), vr == "SQ")
            if (0x6000 <= group <= 0x601E) and code == "X" and (tag & 0xFFFF) == 0x3000:
                overlay_groups.add(group)
            self._act(ds, tag, vr, code, ctx)
        # private creators: keep those that still own an element
        for tag in list(elems):
            if (tag >> 16) & 1 and 0x10 <= (tag & 0xFFFF) <= 0xFF and tag not in private_keep:
                del elems[tag]
        for group in overlay_groups:  # no overlay without its data
            for tag in [t for t in elems if t >> 16 == group]:
                del elems[tag]

    def _walk_items(self, ds: Dataset, tag: int, ctx: _Context) -> None:
        for item in ds[tag].value or []:
            self._walk(item, ctx, top_level=False)

    def _act(self, ds: Dataset, tag: int, vr: str, code: str, ctx: _Context) -> None:
        elems = ds._dict
        if code == "X":
            del elems[tag]
            return
        if code == "Z":
            ds[tag].value = None  # an empty value whatever the VR; a sequence loses its items
            return
        if vr == "SQ":  # D, U, C: keep the items and treat what is inside them
            self._walk_items(ds, tag, ctx)
            return
        elem = ds[tag]
        if code == "U" or (code == "D" and vr == "UI"):
            elem.value = self._remap_uids(elem.value, ctx)
            return
        if code == "D":
            if tag == _PATIENT_ID:
                elem.value = ctx.pseudo.patient_id
            elif vr in _TEXT_VRS:
                elem.value = _DUMMY_TEXT
            elif vr in _BYTES_WIDTH:
                elem.value = b"\x00" * _BYTES_WIDTH[vr]
            else:
                elem.value = _DUMMY[vr]
            return
        if code == "C":
            self._clean(elem, vr, ctx)
            return
        raise ValueError(f"unhandled action {code!r} for {tag:08X}")

    def _clean(self, elem: DataElement, vr: str, ctx: _Context) -> None:
        # a list of values: pydicom keeps a one-item list as that item
        if vr in ("DA", "DT") and self.options.retain_modified_dates:
            fn = shift_date if vr == "DA" else shift_datetime
            elem.value = [fn(v, ctx.shift) for v in _values(elem.value)]
        elif (vr == "TM" or elem.tag == _TIMEZONE_OFFSET) and self.options.retain_modified_dates:
            return  # whole-day shifts leave times, and the offset from UTC, as they are
        elif vr in _TEXT_VRS:
            elem.value = [clean_text(v, ctx.identifiers or []) for v in _values(elem.value)]
        else:  # nothing sensible to clean (Maker Note, Frame Origin Timestamp: bytes): empty it
            elem.value = None

    def _remap_uids(self, value: Any, ctx: _Context) -> Any:
        if self.options.retain_uids:
            return value
        out = []
        for v in map(_uid_text, _values(value)):
            if v and v not in UID_dictionary:  # the DICOM registry's UIDs stay
                new = self.key.uid(v)
                ctx.uids[new] = v
                v = new
            out.append(v)
        return out  # pydicom keeps a one-item list as that item

    def _safe_private(self, ds: Dataset, tag: int) -> bool:
        creator_tag = (tag & 0xFFFF0000) | ((tag >> 8) & 0xFF)
        if creator_tag not in ds._dict:
            return False
        creator = _str(ds[creator_tag].value).strip()
        vr = ds._dict[tag].VR
        # no VR (implicit VR file) or UN: undeclared, the safe list's VR stands
        return is_safe_private(tag >> 16, creator, tag & 0xFF, str(vr) if vr and vr != "UN" else None)

    # -- markers and file meta --------------------------------------------------------------------

    def _markers(self, ds: Dataset, pseudo: Pseudonym) -> None:
        ds.PatientID = pseudo.patient_id  # the walk gave them these values; here also where the source had none
        ds.PatientName = pseudo.patient_name
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = ["medpipe deid", self.options.describe()[:64]]
        items = []
        for name in ("basic", *self.options.chosen):
            value, meaning = CID_7050[name]
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.options.retain_modified_dates
            else "UNMODIFIED" if self.options.retain_full_dates else "REMOVED"
        )

    def _file_meta(self, ds: Dataset, ctx: _Context) -> None:
        import medpipe

        old = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID", "")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or self._remap_uids(
            old.get("MediaStorageSOPInstanceUID", ""), ctx)
        if "TransferSyntaxUID" in old:
            meta.TransferSyntaxUID = old.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"MEDPIPE_{medpipe.__version__}"[:16]
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128


@dataclass
class _Context:
    sop_class: str
    pseudo: Pseudonym
    shift: int
    uids: dict[str, str]
    identifiers: re.Pattern[str] | None = None


def _vr(raw: DataElement | RawDataElement, tag: int) -> str | None:
    """A public element's VR without converting its value: the file's, else (implicit VR, UN) the dictionary's;
    None for a tag the data dictionary does not know, whatever VR the file gives it (nobody can say what it
    holds). An ambiguous dictionary VR ("US or SS", "OB or OW") stays as it is: the walk only compares VRs
    with SQ, and the table's only rows of such attributes (50xx, 60xx Overlay Data) are X."""
    if not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
        return None
    vr = raw.VR
    return str(vr) if vr and vr != "UN" else dictionary_VR(tag)


def _uid_text(value: Any) -> str:
    """A UID value as the key sees it: no surrounding spaces, no NUL padding (left by some writers on each
    value of a multi-valued UI, which pydicom strips from the last only)."""
    return str(value).strip().rstrip("\x00")


def _has_value(raw: DataElement | RawDataElement) -> bool:
    if isinstance(raw, RawDataElement):
        return bool(raw.length)
    return not raw.is_empty


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def identifier_pattern(identifiers: list[str]) -> re.Pattern[str]:
    """One case-insensitive pattern matching any of ``identifiers`` as a whole word (longest first)."""
    words = sorted(set(identifiers), key=len, reverse=True)
    if not words:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"(?<![0-9A-Za-z])(?:" + "|".join(map(re.escape, words)) + r")(?![0-9A-Za-z])", re.IGNORECASE)


def clean_text(text: str, identifiers: re.Pattern[str] | list[str]) -> str:
    """``text`` without the identifying values given, date-like strings, runs of 5+ digits and emptied brackets."""
    pattern = identifiers if isinstance(identifiers, re.Pattern) else identifier_pattern(identifiers)
    out = pattern.sub(" ", text)
    out = _DATE_LIKE.sub(" ", out)
    out = _LONG_DIGITS.sub(" ", out)
    out = re.sub(r"\(\s*\)|\[\s*\]|\{\s*\}", " ", out)  # brackets left empty
    return re.sub(r"\s{2,}", " ", out).strip(" ,;:-_")
