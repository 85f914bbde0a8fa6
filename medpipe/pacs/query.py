"""What to look for at a PACS: a study-level query, from CLI options or a ``pacs://NODE?...`` URL.

``pacs://orthanc?StudyDate=20240101-20240131&Modality=MR&PatientID=P1`` names a node of the node file
and filters by DICOM keywords: ``PatientID``, ``StudyDate`` (``YYYYMMDD``, or a range ``A-B``, ``A-``,
``-B``), ``Modality`` (studies holding that modality; only its series are pulled), ``AccessionNumber``,
``StudyInstanceUID`` (several separated by commas), ``StudyDescription`` (``*`` / ``?`` wildcards), and
``via`` (``move``, ``get`` or ``wado``: the only retrieve method to use). A query without any filter
is refused: it would pull the whole PACS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from medpipe.errors import ConfigError

SCHEME = "pacs"
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
URL_KEYS = {"PatientID": "patient_id", "StudyDate": "study_date", "Modality": "modality",
            "ModalitiesInStudy": "modality", "AccessionNumber": "accession", "StudyInstanceUID": "study_uids",
            "StudyDescription": "description", "via": "via"}


@dataclass(frozen=True)
class StudyQuery:
    patient_id: str | None = None
    study_date: str | None = None
    modality: str | None = None
    accession: str | None = None
    description: str | None = None
    study_uids: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.study_date is not None and (not _DATE.match(self.study_date) or self.study_date in ("", "-")):
            raise ConfigError(f"study date '{self.study_date}': expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD "
                              "(either end may be left open)")
        if self.study_date and "-" in self.study_date:
            a, b = self.study_date.split("-")
            if a and b and a > b:
                raise ConfigError(f"study date range '{self.study_date}' ends before it starts")
        if self.modality is not None and not _MODALITY.match(self.modality):
            raise ConfigError(f"modality '{self.modality}': expected a DICOM modality code such as MR, CT, SEG")
        for uid in self.study_uids:
            if not valid_uid(uid):
                raise ConfigError(f"'{uid}' is not a DICOM UID (digits and dots, at most 64 characters)")

    @property
    def empty(self) -> bool:
        return not any((self.patient_id, self.study_date, self.modality, self.accession, self.description,
                        self.study_uids))

    def study_identifier(self) -> dict[str, Any]:
        """Study-level C-FIND / QIDO-RS keys: the filters plus the return keys medpipe shows."""
        return {
            "PatientID": self.patient_id or "",
            "PatientName": "",
            "StudyDate": self.study_date or "",
            "StudyTime": "",
            "AccessionNumber": self.accession or "",
            "ModalitiesInStudy": self.modality or "",
            "StudyDescription": self.description or "",
            "StudyInstanceUID": list(self.study_uids) if len(self.study_uids) > 1 else
            (self.study_uids[0] if self.study_uids else ""),
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
            "SOPClassesInStudy": "",
        }

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("PatientID", self.patient_id), ("StudyDate", self.study_date),
                                         ("Modality", self.modality), ("AccessionNumber", self.accession),
                                         ("StudyDescription", self.description)) if v]
        if self.study_uids:
            parts.append(f"{len(self.study_uids)} study UID(s)")
        return ", ".join(parts) or "everything"

    def with_studies(self, uids: list[str]) -> StudyQuery:
        return replace(self, study_uids=tuple(uids))


def valid_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID.match(value))


def is_pacs_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(f"{SCHEME}://")


@dataclass(frozen=True)
class PacsSource:
    node: str
    query: StudyQuery
    via: str | None = None


def parse_pacs_url(url: str) -> PacsSource:
    """``pacs://NODE?Key=value&...`` -> node name, query and optional retrieve method."""
    if not is_pacs_url(url):
        raise ConfigError(f"'{url}' is not a pacs://NODE?... URL")
    parts = urlsplit(url)
    node = unquote(parts.netloc)
    if not node or parts.path not in ("", "/"):
        raise ConfigError(f"'{url}': expected pacs://NODE?Key=value&... (a node name of the node file, then "
                          "the query)")
    values: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        target = URL_KEYS.get(key)
        if target is None:
            import difflib

            close = difflib.get_close_matches(key, list(URL_KEYS), n=1)
            raise ConfigError(f"'{url}': unknown query key '{key}'"
                              + (f" (did you mean '{close[0]}'?)" if close else "")
                              + f"; known: {', '.join(URL_KEYS)}")
        if target == "study_uids":
            values["study_uids"] = tuple(values.get("study_uids", ())) + tuple(
                u.strip() for u in value.split(",") if u.strip())
        else:
            values[target] = value
    via = values.pop("via", None)
    if via is not None and via not in ("move", "get", "wado"):
        raise ConfigError(f"'{url}': via={via}: expected move, get or wado")
    query = StudyQuery(**values)
    if query.empty:
        raise ConfigError(f"'{url}': a query without filters would pull the whole PACS",
                          hint="add e.g. ?StudyDate=20240101-20240131&Modality=MR or ?StudyInstanceUID=...")
    return PacsSource(node, query, via)
