"""Input channels: which ingested series of a study is which channel, by rules on DICOM attributes.

Per study (``StudyInstanceUID``), each channel is the one ingested volume (status ``ok`` or
``warning``, 3D) that matches its :class:`ChannelRule`, in the spirit of MONAI Deploy's series
selection rules::

    T1:    {modality: MR, series_description: "(?i)^t1$"}
    FLAIR: {modality: MR, series_description: "(?i)flair", min_slices: 20}

A rule may use ``modality`` (exact, case-insensitive), ``series_description``, ``protocol_name`` and
``image_type`` (regular expressions, ``re.search``; ``image_type`` is matched against the values
joined with ``\\``, e.g. ``ORIGINAL\\PRIMARY\\OTHER``) and ``min_slices``. A channel that matches no
volume or several, or one volume that matches several channels, makes the study unusable
(:class:`StudySkipped`, with a one-line reason).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medpipe.errors import MedpipeError

if TYPE_CHECKING:  # the catalog imports pydicom: not needed to validate a pipeline file
    from medpipe.catalog import VolumeRow


class StudySkipped(MedpipeError):
    """A study that cannot become a datalist item; the message is the one-line reason."""


def check_regex(value: str | None) -> str | None:
    """Pydantic validator: ``value`` compiles as a regular expression."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from None
    return value


class ChannelRule(BaseModel):
    """Which series is a channel: every given condition must hold."""

    model_config = ConfigDict(extra="forbid")

    modality: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    image_type: str | None = None
    min_slices: int | None = Field(default=None, ge=1)

    _regex = field_validator("series_description", "protocol_name", "image_type")(check_regex)

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.model_dump(exclude_none=True).items()]
        return ", ".join(parts) or "any series"


DEFAULT_CHANNELS: dict[str, ChannelRule] = {
    "T1": ChannelRule(modality="MR", series_description=r"(?i)^t1$"),
    "T1c": ChannelRule(modality="MR", series_description=r"(?i)^t1c$|post|gd"),
    "T2": ChannelRule(modality="MR", series_description=r"(?i)^t2$"),
    "FLAIR": ChannelRule(modality="MR", series_description=r"(?i)flair"),
}


@dataclass
class Candidate:
    """One ingested volume that may become a channel."""

    row: VolumeRow
    sidecar: dict[str, Any]  # the volume's JSON sidecar (DICOM attributes), {} when unreadable
    path: Path  # the NIfTI volume
    n_slices: int

    @property
    def label(self) -> str:
        r = self.row
        return f"series {r.series_number} {r.series_description!r}" + (f" [{r.part}]" if r.part else "")

    def matches(self, rule: ChannelRule) -> bool:
        r, s = self.row, self.sidecar
        if rule.modality is not None and str(r.modality or "").upper() != rule.modality.upper():
            return False
        if rule.series_description is not None and not re.search(rule.series_description, r.series_description or ""):
            return False
        if rule.protocol_name is not None and not re.search(rule.protocol_name, str(s.get("ProtocolName") or "")):
            return False
        if rule.image_type is not None:
            value = s.get("ImageType") or []
            text = "\\".join(value) if isinstance(value, list) else str(value)
            if not re.search(rule.image_type, text):
                return False
        return rule.min_slices is None or self.n_slices >= rule.min_slices


def candidates(ingest_dir: Path, volumes: list[VolumeRow]) -> dict[tuple[str, str], list[Candidate]]:
    """The usable 3D volumes among ``volumes`` (catalog order kept), grouped by (patient_id, study_uid).

    A series without a Study Instance UID (blanked by a de-identification) is not dropped: it is grouped
    under ``no-study-uid-<hash of patient and frame of reference>`` (the series of one acquisition share
    their frame of reference), as ingest names series without a Series Instance UID.
    """
    studies: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for row in volumes:
        if row.status not in ("ok", "warning") or not row.volume:
            continue
        shape = row.dims
        if len(shape) != 3:
            continue  # 2D images and 4D series are not channels
        sidecar: dict[str, Any] = {}
        if row.sidecar:
            try:
                sidecar = json.loads((ingest_dir / row.sidecar).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                sidecar = {}
        study = row.study_uid or _substitute_study(row, sidecar)
        studies[(row.patient_id or "", study)].append(Candidate(row, sidecar, ingest_dir / row.volume, shape[2]))
    return studies


def _substitute_study(row: VolumeRow, sidecar: dict[str, Any]) -> str:
    anchor = str(sidecar.get("FrameOfReferenceUID") or row.series_uid or row.stack_id)
    return "no-study-uid-" + hashlib.sha1(f"{row.patient_id or ''}\0{anchor}".encode()).hexdigest()[:16]


def select_channels(cands: list[Candidate], rules: dict[str, ChannelRule]) -> dict[str, Candidate]:
    """Channel name -> the one candidate its rule matches (in the order of ``rules``).

    Raises:
        StudySkipped: a rule matches no candidate or several, or one candidate matches several rules.
    """
    chosen: dict[str, Candidate] = {}
    for name, rule in rules.items():
        hits = [c for c in cands if c.matches(rule)]
        if not hits:
            raise StudySkipped(f"no series matches channel {name} ({rule.describe()})")
        if len(hits) > 1:
            raise StudySkipped(f"{len(hits)} series match channel {name} ({rule.describe()}): "
                               + ", ".join(c.label for c in hits) + "; make the rule stricter")
        chosen[name] = hits[0]
    used: dict[str, list[str]] = defaultdict(list)
    for name, c in chosen.items():
        used[c.row.stack_id].append(name)
    for names in used.values():
        if len(names) > 1:
            raise StudySkipped(f"one series matches channels {' and '.join(names)} ({chosen[names[0]].label})")
    return chosen
