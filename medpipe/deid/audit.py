"""Find identifying values of a source file in the bytes of another file (a leak check).

Independent of the profile table on purpose: :func:`identifying_values` picks values by what they are
(person names, dates, identifiers, addresses, institutions, devices, free-text comments, private text,
instance UIDs), not by the table's actions, so a gap in the table shows up as a leak. Used by the tests
and ``benchmarks/deid.py`` to count PHI left behind by any tool.

:func:`leaks` scans the raw bytes of an output file; occurrences inside its Pixel Data are not counted
when they are as many as in the source's pixel data (the pixels are compared separately), so random
pixel bytes never pass for a leak.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

#: attributes whose values identify a patient, a visit, a place or a device (besides PN, DA, DT and UIDs)
IDENTIFYING_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "StudyID", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "PatientAddress",
    "PatientTelephoneNumbers", "BranchOfService", "MedicalRecordLocator", "RequestingService",
    "CurrentPatientLocation", "PatientInstitutionResidence", "AdmissionID", "IssuerOfAdmissionID",
    "PerformedProcedureStepID", "RequestedProcedureID", "ScheduledProcedureStepID", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "AdditionalPatientHistory", "PatientComments", "ImageComments",
    "StudyComments", "VisitComments", "Occupation", "NetworkID", "StationAETitle", "RetrieveAETitle",
    "DetectorID", "PlateID", "CassetteID", "GantryID", "GeneratorID", "TransducerIdentificationSequence",
    "DeviceUID", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "RegionOfResidence",
    "CountryOfResidence", "MilitaryRank", "EthnicGroup", "PatientReligiousPreference", "MedicalAlerts",
    "Allergies", "PatientState", "SpecialNeeds", "InterpretationText", "TextValue", "ContentCreatorName",
    "AcquisitionComments", "ServiceEpisodeID", "ServiceEpisodeDescription", "ClinicalTrialSubjectID",
    "ClinicalTrialSponsorName", "ClinicalTrialSiteName", "PerformedLocation", "ScheduledStationName",
    "ScheduledProcedureStepLocation", "PerformedStationName", "PerformedStationAETitle", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "OrderEntererLocation", "OrderCallbackPhoneNumber", "OperatorsName",
})
#: free text (kept, cleaned, under Clean Descriptors / Retain Patient Characteristics)
FREE_TEXT_KEYWORDS = frozenset({
    "ReasonForStudy", "ReasonForTheRequestedProcedure", "AdditionalPatientHistory", "PatientComments",
    "ImageComments", "StudyComments", "VisitComments", "MedicalAlerts", "Allergies", "PatientState",
    "SpecialNeeds", "InterpretationText", "TextValue", "AcquisitionComments", "ServiceEpisodeDescription",
})
#: UI attributes naming classes or syntaxes, not instances (never pseudonymised)
_CLASS_UIDS = frozenset({
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
    "ImplementationClassUID", "ReferencedSOPClassUIDInFile", "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID", "ReferencedTransferSyntaxUIDInFile", "CodingSchemeUID",
    "ContextGroupExtensionCreatorUID", "MappingResourceUID", "AffectedSOPClassUID", "RequestedSOPClassUID",
    "SOPClassesInStudy", "PrivateInformationCreatorUID", "StorageMediaFileSetUID",
})
#: coded concepts (a procedure's code meaning repeats its description): terminology, not identifiers
_CODE_KEYWORDS = frozenset({"CodeValue", "CodeMeaning", "CodingSchemeDesignator", "LongCodeValue", "URNCodeValue"})
_TEXT = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def identifying_values(ds: Dataset, min_length: int = 4, free_text: bool = True) -> set[str]:
    """Identifying values in ``ds`` (sequences and file meta included), each at least ``min_length`` long.

    ``free_text``: also whole free-text values (comments, reasons, histories); leave them out when checking
    the output of options that keep cleaned free text (the identifying values inside are still checked).
    """
    found: set[str] = set()

    def add(text: str) -> None:
        text = text.strip().strip("\x00").strip()
        if len(text) >= min_length and not re.fullmatch(r"[0.\s-]*", text) and text not in coded:
            found.add(text)

    coded = {s.strip() for e in ds.iterall() if e.keyword in _CODE_KEYWORDS for s in _strings(e.value)}
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        add(str(meta.MediaStorageSOPInstanceUID))
    for elem in ds.iterall():
        vr, kw = elem.VR, elem.keyword
        if elem.tag.is_private:
            if vr in _TEXT and not elem.tag.is_private_creator:
                for s in _strings(elem.value):
                    add(s)
            continue
        if vr == "PN":
            for s in _strings(elem.value):
                for part in re.split(r"[\^=]", s):
                    add(part)
        elif vr in ("DA", "DT"):
            for s in _strings(elem.value):
                add(s)
        elif vr == "UI":
            if kw not in _CLASS_UIDS:
                for s in _strings(elem.value):
                    if s not in UID_dictionary:
                        add(s)
        elif (kw in IDENTIFYING_KEYWORDS and (free_text or kw not in FREE_TEXT_KEYWORDS)) and vr in _TEXT:
            for s in _strings(elem.value):
                add(s)
    return found


def _pixel_bytes(ds: Dataset) -> bytes:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            value = ds[kw].value
            return value if isinstance(value, bytes) else b""
    return b""


def leaks(output: Path | str, values: set[str]) -> list[str]:
    """The ``values`` whose bytes (Latin-1 or UTF-8) occur in the file ``output`` outside its pixel data.

    A value counts where it stands as a whole word (no letter or digit right before or after it), so
    'MARY' is not found in 'PRIMARY'.
    """
    import pydicom

    data = Path(output).read_bytes()
    pixels: bytes | None = None
    found = []
    for v in sorted(values):
        for b in dict.fromkeys((v.encode("utf-8"), v.encode("latin-1", "replace"))):  # UTF-8 first, once if ASCII
            if b not in data:  # the common case, and fast
                continue
            word = re.compile(rb"(?<![0-9A-Za-z])" + re.escape(b) + rb"(?![0-9A-Za-z])")
            hits = len(word.findall(data))
            if not hits:
                continue
            if pixels is None:
                try:
                    pixels = _pixel_bytes(pydicom.dcmread(output, force=True))
                except Exception:  # noqa: BLE001 - not DICOM (e.g. a CSV report): every byte counts
                    pixels = b""
            if hits > len(word.findall(pixels)):
                found.append(v)
                break
    return found
