"""Test data for de-identification: deid-data's real vendor-shaped files and the sample with planted PHI."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.dicom_checks import dciodvfy_report

#: per sample case: the PHI planted into every file of that patient
PATIENTS = [
    {"name": "Doe^Jonathan^Quincy", "id": "MRN-884211", "other_id": "SSN123456789", "birth": "19580412",
     "address": "42 Wallaby Way, Sydney", "phone": "555-867-5309", "accession": "ACC20240311X"},
    {"name": "Roe^Margaret", "id": "MRN-552190", "other_id": "SSN987654321", "birth": "19630927",
     "address": "1313 Mockingbird Lane", "phone": "555-010-4477", "accession": "ACC20240312Y"},
]
COMMON = {
    "institution": "St. Elsewhere General Hospital", "institution_address": "1 Hospital Road, Springfield",
    "department": "Neuroradiology Zeta", "station": "MRSCAN-ZETA7", "serial": "SN-99887766",
    "referring": "House^Gregory", "performing": "Quinn^Michaela", "operator": "Tech^Tommy",
    "study_id": "STUDY-4711", "nested_address": "221B Baker Street", "nested_institution": "Nested Clinic Omega",
    "nested_id": "ALT-ID-5555", "nested_issuer": "Nested Issuer Kappa", "requested_id": "RP-31337",
    "private_text": "private note Zanzibar", "acq_datetime": "20240311093015",
}


_LAST = ["Doe", "Roe", "Smithers", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Haddad", "Ferreira"]
_FIRST = ["Jonathan", "Margaret", "Wilhelmina", "Chidi", "Astrid", "Lucien", "Haruki", "Zofia", "Samir", "Ines"]


def fictitious_patient(i: int) -> dict[str, str]:
    """Patient ``i`` of a larger export: distinct fictitious PHI per patient (same keys as PATIENTS)."""
    last, first = _LAST[i % len(_LAST)], _FIRST[(i * 3 + 1) % len(_FIRST)]
    return {"name": f"{last}^{first}", "id": f"MRN-{700000 + 7919 * i}", "other_id": f"SSN{100000000 + 104729 * i}",
            "birth": f"{1940 + i % 50}{1 + i % 12:02d}{1 + i % 28:02d}", "address": f"{10 + i} Elm Street, Unit {i}",
            "phone": f"555-{100 + i:03d}-{2000 + i:04d}", "accession": f"ACC{900000 + i}"}


def planted_values() -> set[str]:
    """Every planted value and its parts (names split into components), as the byte scan looks for them."""
    out: set[str] = set()
    for p in PATIENTS:
        for v in p.values():
            out.add(v)
        out.update(part for part in p["name"].split("^") if part)
    for k, v in COMMON.items():
        out.add(v)
        if k in ("referring", "performing", "operator"):
            out.update(v.split("^"))
    return out


def plant_phi(ds: Dataset, patient: dict[str, str]) -> None:
    """Fill ``ds`` with realistic PHI: top level, nested sequences (two levels) and private tags."""
    first = patient["name"].split("^")[1]
    last = patient["name"].split("^")[0]
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.OtherPatientIDs = patient["other_id"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientAddress = patient["address"]
    ds.PatientTelephoneNumbers = patient["phone"]
    ds.AccessionNumber = patient["accession"]
    ds.StudyID = COMMON["study_id"]
    ds.InstitutionName = COMMON["institution"]
    ds.InstitutionAddress = COMMON["institution_address"]
    ds.InstitutionalDepartmentName = COMMON["department"]
    ds.StationName = COMMON["station"]
    ds.DeviceSerialNumber = COMMON["serial"]
    ds.ReferringPhysicianName = COMMON["referring"]
    ds.PerformingPhysicianName = COMMON["performing"]
    ds.OperatorsName = COMMON["operator"]
    ds.AcquisitionDateTime = COMMON["acq_datetime"]
    ds.StudyDescription = f"MRI brain for {first} {last} {patient['birth'][:4]}-{patient['birth'][4:6]}-{patient['birth'][6:]}"
    if "SeriesDescription" in ds:
        ds.SeriesDescription = f"{ds.SeriesDescription} ({first} {last})"
    ds.ImageComments = f"Patient {first} {last} called {patient['phone']}"
    # nested: Request Attributes > Referenced Study (the original study UID); physician identification
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    request = Dataset()
    request.AccessionNumber = patient["accession"]
    request.RequestedProcedureID = COMMON["requested_id"]
    request.ReferencedStudySequence = Sequence([ref_study])
    ds.RequestAttributesSequence = Sequence([request])
    person = Dataset()
    person.PersonAddress = COMMON["nested_address"]
    person.InstitutionName = COMMON["nested_institution"]
    ds.ReferringPhysicianIdentificationSequence = Sequence([person])
    other = Dataset()
    other.PatientID = COMMON["nested_id"]
    other.IssuerOfPatientID = COMMON["nested_issuer"]
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    # private: a block at the top level and one inside a private sequence item
    block = ds.private_block(0x0009, "ACME PHI 1.0", create=True)
    block.add_new(0x01, "LO", f"{first} {last}")
    inner = Dataset()
    inner_block = inner.private_block(0x0009, "ACME PHI 1.0", create=True)
    inner_block.add_new(0x03, "LO", f"{patient['id']} {COMMON['private_text']}")
    block.add_new(0x02, "SQ", Sequence([inner]))


def planted_sample(root: Path, cases: int = 2) -> tuple[Path, dict[str, dict[str, str]]]:
    """A small generated brain-tumour export (``root/src``) with PHI planted in every file.

    Case k gets ``PATIENTS[k % 2]``; with 3 cases the third is a second study of the first patient.
    Returns the source folder and sample PatientID -> planted patient.
    """
    from medpipe.sample import generate_brain_tumor

    gen = root / "generated"
    generate_brain_tumor(gen, cases=cases, seed=3, tumor_fraction=1.0, matrix=32, pixel_spacing=6.0, slices=8,
                         slice_thickness=10.0)
    src = root / "src"
    shutil.copytree(gen / "dicom", src)
    who: dict[str, dict[str, str]] = {}
    for i, case_dir in enumerate(sorted(p for p in src.iterdir() if p.is_dir())):
        patient = PATIENTS[i % 2]
        who[case_dir.name] = patient
        for f in sorted(case_dir.rglob("*.dcm")):
            ds = pydicom.dcmread(f)
            plant_phi(ds, patient)
            ds.save_as(f, enforce_file_format=True)
    return src, who


def deid_data_folder() -> Path:
    """The files of the ``deid-data`` package (real vendor headers, fictitious PHI)."""
    import deid_data

    return Path(deid_data.__file__).parent / "data"


def _normalise(line: str) -> str:
    """A dciodvfy message without the values it quotes (which de-identification changes)."""
    line = re.sub(r"\[\d+\] = <.*", "", line)  # '... UI [1] = <1.2.3> - ...': the value and what follows
    line = re.sub(r"= '.' \(0x[0-9a-f]+\)", "", line)
    return line.strip()


def new_dciodvfy_errors(source: Path, output: Path) -> list[str]:
    """dciodvfy errors of ``output`` that ``source`` does not have (values in the messages ignored)."""
    before = Counter(_normalise(x) for x in dciodvfy_report(source)[1] if x.startswith("Error"))
    after = Counter(_normalise(x) for x in dciodvfy_report(output)[1] if x.startswith("Error"))
    return sorted((after - before).elements())
