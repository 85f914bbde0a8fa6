"""``medpipe reidentify``: results made on de-identified data, turned back onto the original study.

For every DICOM object under ``RESULTS`` (SEG, SR, Parametric Map, ... from ``medpipe score``):

* every UID anywhere in the object (Study / Series / SOP Instance / Frame of Reference UIDs, every
  Referenced SOP Instance UID, UIDs inside SR content) that the map knows as a pseudonym is replaced by
  the original, after checking with the key that the pair is genuine (``key.uid(original) == pseudonym``:
  a map edited by hand, or made with another key, is refused);
* the Patient module (name, ID, issuer, birth date, sex...) and the General Study module (accession
  number, study ID, date, time, referring physician, description) are put back from the map; a Patient
  attribute the original did not have is emptied (the pseudonymous Patient ID and Name included);
* the de-identification markers (Patient Identity Removed, De-identification Method and its code
  sequence, Longitudinal Temporal Information Modified) are removed.

The object's own new UIDs (a SEG made by the model) are not in the map and stay as they are. Output:
``OUT/<PatientID>/<StudyInstanceUID>/<Modality>_<SOPInstanceUID>.dcm`` (``unknown`` for an empty Patient ID,
``OBJ`` for a missing Modality), ready to send to the PACS; objects that cannot be re-identified (unreadable,
without SOP Instance UID, patient or study not in the map) are listed in ``OUT/rejected.csv``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.deid.engine import PATIENT_KEYWORDS, STUDY_KEYWORDS
from medpipe.deid.keys import DeidKey, load_key
from medpipe.deid.mapping import read_map
from medpipe.errors import ConfigError, SourceError
from medpipe.io import atomic_path, write_csv_atomic

log = logging.getLogger(__name__)

MARKERS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
           "LongitudinalTemporalInformationModified")


@dataclass
class ReidReport:
    out: Path
    written: list[str]  # output paths relative to OUT
    rejected: list[tuple[str, str]]  # (input path relative to RESULTS, reason)


class _Restorer:
    def __init__(self, key: DeidKey, doc: dict[str, Any]) -> None:
        self.key = key
        self.uids: dict[str, str] = doc["uids"]
        self.patients: dict[str, dict[str, Any]] = doc["patients"]
        self.studies: dict[str, dict[str, Any]] = doc["studies"]
        self._checked: set[str] = set()

    def original_uid(self, uid: str) -> str | None:
        orig = self.uids.get(uid)
        if orig is None:
            return None
        if uid not in self._checked:
            if self.key.uid(orig) != uid:
                raise ConfigError(f"the map's entry for UID {uid} does not match the key (edited map, or another key)",
                                  hint="use the map and key of the de-identification run")
            self._checked.add(uid)
        return orig

    def restore(self, ds: Any) -> None:
        """Put the original UIDs back into ``ds`` (``dcmwrite`` copies the SOP Instance UID into the file meta)."""
        for elem in ds.iterall():
            if elem.VR == "UI" and elem.value:
                values = [str(v) for v in elem.value] if elem.VM > 1 else [str(elem.value)]
                new = [self.original_uid(v) or v for v in values]
                if new != values:
                    elem.value = new  # pydicom keeps a one-item list as that item


def _set(ds: Any, keyword: str, value: str) -> None:
    """``ds.<keyword> = value`` (pydicom splits a multi-valued ``a\\b``); an empty Other Patient IDs, a retired
    attribute, is not written back."""
    if keyword == "OtherPatientIDs" and not value:
        return
    setattr(ds, keyword, value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64] or "unknown"


def reidentify(results: Path | str, out: Path | str, key_path: Path | str, map_path: Path | str) -> ReidReport:
    """Re-identify every DICOM object under ``results`` into ``out``; see the module docstring.

    Raises:
        SourceError: ``results`` missing or without files.
        ConfigError: key or map unusable, or a map entry that does not match the key.
    """
    import warnings

    import pydicom
    from pydicom.errors import InvalidDicomError

    results = Path(results).expanduser()
    out = Path(out).expanduser().resolve()
    if not results.exists():
        raise SourceError(f"{results}: no such file or folder")
    files = [results] if results.is_file() else sorted(p for p in results.rglob("*") if p.is_file())
    if not files:
        raise SourceError(f"{results}: no files found")
    key = load_key(key_path)
    restorer = _Restorer(key, read_map(map_path, key.key_id))
    written: list[str] = []
    rejected: list[tuple[str, str]] = []
    base = results if results.is_dir() else results.parent
    for path in files:
        rel = str(path.relative_to(base))
        if out in path.resolve().parents:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            if path.suffix.lower() == ".dcm":
                rejected.append((rel, "not a readable DICOM file"))
            continue
        if not ds.get("SOPInstanceUID"):
            rejected.append((rel, "no SOP Instance UID"))
            continue
        pseudo_pid = str(ds.get("PatientID", "") or "")
        patient = restorer.patients.get(pseudo_pid)
        study = restorer.studies.get(str(ds.get("StudyInstanceUID", "") or ""))
        if patient is None or study is None:
            what = "patient" if patient is None else "study"
            rejected.append((rel, f"its {what} is not in the map (not made on data de-identified with this map)"))
            continue
        restorer.restore(ds)
        for kw in PATIENT_KEYWORDS:
            if kw in patient:
                _set(ds, kw, str(patient[kw]))
            elif kw in ds:  # the original had none: no pseudonym stays (emptied, as Type 2 ones must stay)
                ds[kw].value = None
        for kw in STUDY_KEYWORDS:
            if kw in study and kw != "StudyInstanceUID":
                _set(ds, kw, str(study[kw]))
        for kw in MARKERS:
            if kw in ds:
                delattr(ds, kw)
        target = (f"{_safe(str(ds.get('PatientID', '') or 'unknown'))}/{_safe(str(ds.StudyInstanceUID))}/"
                  f"{_safe(str(ds.get('Modality', '') or 'OBJ'))}_{_safe(str(ds.SOPInstanceUID))}.dcm")
        with atomic_path(out / target) as tmp:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        written.append(target)
    if rejected:
        write_csv_atomic(out / "rejected.csv", [{"path": p, "reason": r} for p, r in rejected], ["path", "reason"])
    return ReidReport(out, written, rejected)
