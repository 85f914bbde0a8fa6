"""The private map (original <-> pseudonym) and the user's patient mapping CSV.

Map file (JSON, mode 0600, kept apart from the de-identified data; default: beside the key file)::

    {"format": "medpipe-deid-map", "version": 1, "key_id": "<16 hex>",
     "patients": {"<pseudonymous PatientID>": {"PatientID": ..., "PatientName": ..., "PatientBirthDate": ...,
                                               "PatientSex": ..., "date_shift_days": -123, ...}},
     "studies":  {"<pseudonymous StudyInstanceUID>": {"StudyInstanceUID": ..., "AccessionNumber": ...,
                                                      "StudyDate": ..., "PatientID": "<pseudonym>", ...}},
     "uids":     {"<pseudonymous UID>": "<original UID>", ...},
     "files":    {"F<16 hex>": "<source path relative to SRC>", ...}}

One map serves every run made with one key (runs merge into it under a file lock); a map made with
another key is refused. ``medpipe reidentify`` checks each UID pair against the key before using it.

Patient mapping CSV (``--patients``): columns ``PatientID`` and ``PseudonymID``, optionally
``PseudonymName``; listed patients get these pseudonyms instead of the keyed ones.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medpipe.deid.engine import Mapping, Pseudonym
from medpipe.errors import ConfigError
from medpipe.io import atomic_path

FORMAT = "medpipe-deid-map"
SECTIONS = ("patients", "studies", "uids", "files")


def default_map_path(key_path: Path | str) -> Path:
    key_path = Path(key_path).expanduser()
    return key_path.with_name(key_path.name + ".map.json")


class MapBuilder:
    """Collects map entries during a run (in the main process)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}

    def add(self, m: Mapping) -> None:
        if m.patient:
            self.data["patients"].setdefault(m.patient[0], m.patient[1])
        if m.study:
            self.data["studies"].setdefault(m.study[0], m.study[1])
        self.data["uids"].update(m.uids)

    def add_file(self, ref: str, relpath: str) -> None:
        self.data["files"][ref] = relpath


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_map(path: Path | str, key_id: str | None = None) -> dict[str, Any]:
    """A map file's content (checked against ``key_id`` when given).

    Raises:
        ConfigError: missing, not a map, or made with another key.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such map file", hint="give the map written by `medpipe deid` (--map)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable map file ({type(exc).__name__})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a medpipe de-identification map")
    if key_id is not None and doc.get("key_id") != key_id:
        raise ConfigError(f"{path}: this map was made with another key (key id {doc.get('key_id')}, not {key_id})",
                          hint="use the key the data was de-identified with")
    for s in SECTIONS:
        doc.setdefault(s, {})
    return doc


def merge_into_map(path: Path | str, key_id: str, builder: MapBuilder) -> Path:
    """Merge ``builder``'s entries into the map at ``path`` (created 0600 if absent), under a lock."""
    path = Path(path).expanduser()
    with _locked(path):
        if path.exists():
            doc = read_map(path, key_id)
        else:
            doc = {"format": FORMAT, "version": 1, "key_id": key_id, **{s: {} for s in SECTIONS}}
        for s in SECTIONS:
            doc[s].update(builder.data[s])
        with atomic_path(path) as tmp:
            os.chmod(tmp, 0o600)
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def read_patient_csv(path: Path | str) -> dict[str, Pseudonym]:
    """A user's patient mapping: original PatientID -> pseudonym (see the module docstring).

    Raises:
        ConfigError: unreadable file, missing columns, empty or repeated values.
    """
    path = Path(path).expanduser()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the patient mapping ({exc.strerror or exc})") from exc
    if not {"PatientID", "PseudonymID"} <= columns:
        raise ConfigError(f"{path}: the patient mapping needs columns PatientID and PseudonymID (optional PseudonymName)")
    out: dict[str, Pseudonym] = {}
    used: set[str] = set()
    for i, row in enumerate(rows, start=2):
        pid, pseudo = (row.get("PatientID") or "").strip(), (row.get("PseudonymID") or "").strip()
        if not pid or not pseudo:
            raise ConfigError(f"{path} line {i}: empty PatientID or PseudonymID")
        if pid in out:
            raise ConfigError(f"{path} line {i}: PatientID listed twice")
        if pseudo in used:
            raise ConfigError(f"{path} line {i}: PseudonymID {pseudo!r} given to two patients")
        if len(pseudo) > 64:
            raise ConfigError(f"{path} line {i}: PseudonymID longer than 64 characters (LO)")
        used.add(pseudo)
        out[pid] = Pseudonym(pseudo, (row.get("PseudonymName") or "").strip() or pseudo)
    return out
