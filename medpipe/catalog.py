"""The ingest catalog: one SQLite file per output folder.

Tables
------
``files``      every file ever scanned (key, size, mtime) with its parsed header (JSON) or the
               reason it was rejected; the cache that makes re-runs incremental.
``patients``, ``studies``, ``series``, ``instances``
               the DICOM hierarchy of the usable image files (rebuilt from ``files`` each run).
``objects``    non-image DICOM objects (SEG, SR, RT structure sets, ...) with the series they
               reference, so label and report objects can be found per study.
``volumes``    one row per output volume (a series or a part of a split series), with status,
               reasons, the NIfTI path and the hash of its inputs (unchanged inputs are not rebuilt).

Two ways in: :class:`Catalog` is ingest's writer (it creates the file and rebuilds an old layout);
everyone else reads through :func:`open_catalog`, a read-only connection (``mode=ro``) that returns
typed rows (:class:`VolumeRow`, :class:`ObjectRow`, :class:`SeriesRow`, :class:`InstanceRow`), never
creates the catalog, never writes it and never takes a write lock, so a reader cannot disturb a
running ingest. (SQLite may still create the ``-wal`` / ``-shm`` companions of a WAL-mode catalog: its
readers share that index with a writer.)

The catalog is a cache of the sources and the outputs: :class:`Catalog` rebuilds one of an older
layout, and one that is corrupt (not a database, or failing SQLite's ``quick_check``), from scratch.

File keys (:mod:`medpipe.dicom.sources`) are stored as they are; a volume's source keys (the ``files``
column) as a JSON list, since a legal file name may hold any character, a newline included.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from medpipe.dicom.header import InstanceHeader
from medpipe.errors import CatalogError

log = logging.getLogger(__name__)

#: the catalog's file name in an ingest output folder
CATALOG_FILE = "catalog.sqlite"

#: 5: zip member keys ``zip:<archive>::<member>`` (were ``<archive>::<member>``), ``volumes.files`` a JSON list
SCHEMA_VERSION = 5


def join_keys(keys: Iterable[str]) -> str:
    """Source keys as the ``volumes.files`` column stores them (a JSON list)."""
    return json.dumps(list(keys), ensure_ascii=False)


def split_keys(files: str | None) -> list[str]:
    """The source keys of a ``volumes.files`` value (:func:`join_keys`)."""
    if not files:
        return []
    try:
        keys = json.loads(files)
    except ValueError:
        return []
    return [k for k in keys if isinstance(k, str) and k] if isinstance(keys, list) else []


class CatalogCorrupt(Exception):
    """``catalog.sqlite`` is damaged (it is rebuilt)."""


#: SQLite primary result codes of a damaged database file
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def is_corrupt(exc: BaseException) -> bool:
    """Whether an SQLite error means the database file is damaged (rather than full, read-only, locked)."""
    if isinstance(exc, CatalogCorrupt):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files(
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sop_uid TEXT, series_uid TEXT, reason TEXT, header TEXT);
CREATE INDEX IF NOT EXISTS files_sop ON files(sop_uid);
CREATE INDEX IF NOT EXISTS files_series ON files(series_uid);
CREATE TABLE IF NOT EXISTS patients(patient_id TEXT PRIMARY KEY, patient_name TEXT);
CREATE TABLE IF NOT EXISTS studies(
    study_uid TEXT PRIMARY KEY, patient_id TEXT, study_date TEXT, study_description TEXT);
CREATE TABLE IF NOT EXISTS series(
    series_uid TEXT PRIMARY KEY, study_uid TEXT, modality TEXT, series_number INTEGER,
    series_description TEXT);
CREATE TABLE IF NOT EXISTS instances(
    sop_uid TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, series_uid TEXT,
    instance_number INTEGER, position TEXT, n_frames INTEGER);
CREATE TABLE IF NOT EXISTS objects(
    path TEXT PRIMARY KEY, sop_uid TEXT, sop_class TEXT, kind TEXT, modality TEXT, patient_id TEXT,
    study_uid TEXT, series_uid TEXT, series_description TEXT, referenced_series TEXT);
CREATE TABLE IF NOT EXISTS volumes(
    stack_id TEXT PRIMARY KEY, series_uid TEXT, study_uid TEXT, patient_id TEXT, modality TEXT,
    series_number INTEGER, series_description TEXT, part TEXT, n_files INTEGER, shape TEXT,
    spacing TEXT, status TEXT, reasons TEXT, volume TEXT, sidecar TEXT, preview TEXT, input_hash TEXT,
    files TEXT);
"""


_COUNTS = {
    "patients": "SELECT COUNT(*) FROM patients",
    "studies": "SELECT COUNT(*) FROM studies",
    "series": "SELECT COUNT(*) FROM series",
    "instances": "SELECT COUNT(*) FROM instances",
    "files": "SELECT COUNT(*) FROM files",
    "rejected_files": "SELECT COUNT(*) FROM files WHERE reason IS NOT NULL",
    "volumes": "SELECT COUNT(*) FROM volumes WHERE status != 'rejected'",
}


@dataclass
class FileRow:
    """One scanned file: its parsed header (as JSON, made in the scanning worker) or why it is not used.

    A usable file with no header is a NIfTI input.
    """

    key: str
    size: int
    mtime_ns: int
    sop_uid: str | None
    series_uid: str | None
    reason: str | None
    header_json: str | None


class Catalog:
    """Thin typed access to ``catalog.sqlite``; every write happens in a transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            # a cache of the sources and outputs: a damaged one is rebuilt from scratch
            log.warning("%s is corrupt (%s): rebuilding it", self.path, exc)
            self.remove(self.path)
            self._open()

    @staticmethod
    def remove(path: Path | str) -> None:
        """Delete a catalog file and its SQLite companions (``-wal``, ``-shm``, ``-journal``)."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    def _open(self) -> None:
        if self.path.exists() and not self.path.is_file():
            raise CatalogError(f"{self.path} is not a file, so it cannot be the ingest catalog: move it away",
                               hint="ingest keeps its catalog in that file of the --out folder")
        self.db = sqlite3.connect(self.path, timeout=30)
        try:
            self._prepare()
        except BaseException:
            self.db.close()
            raise

    def _prepare(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        # no fsync: the catalog is a cache of the sources and outputs (none of which ingest fsyncs
        # either); a killed process never damages it, and one damaged by a crash of the machine is
        # found by the quick_check below and rebuilt
        self.db.execute("PRAGMA synchronous=OFF")
        (check,) = self.db.execute("PRAGMA quick_check(1)").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
        self.db.executescript("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] != str(SCHEMA_VERSION):
            # the catalog is a cache of the sources and outputs: an old layout is simply rebuilt
            for (table,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                self.db.execute(f"DROP TABLE {table}")
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    # -- the scan cache -------------------------------------------------------------------
    def known_files(self, keys: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
        """``key -> (size, mtime_ns)`` of files already scanned."""
        rows = self.db.execute("SELECT key, size, mtime_ns FROM files")
        out = {k: (s, m) for k, s, m in rows}
        if keys is not None:
            wanted = set(keys)
            out = {k: v for k, v in out.items() if k in wanted}
        return out

    def put_files(self, rows: Iterable[FileRow]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.key, r.size, r.mtime_ns, r.sop_uid, r.series_uid, r.reason, r.header_json) for r in rows],
            )

    def set_reason(self, key: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE files SET reason = ?, header = NULL, series_uid = NULL WHERE key = ?", (reason, key))

    def forget_files(self, keys: Iterable[str]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM files WHERE key = ?", [(k,) for k in keys])

    def rejected_files(self) -> Iterator[tuple[str, str]]:
        yield from self.db.execute("SELECT key, reason FROM files WHERE reason IS NOT NULL ORDER BY key")

    def duplicate_files(self) -> Iterator[tuple[str, str, str]]:
        """``(key, sop_uid, kept key)`` of usable files whose SOP Instance UID an earlier key already has."""
        yield from self.db.execute(
            """SELECT f.key, f.sop_uid, (SELECT MIN(g.key) FROM files g WHERE g.sop_uid = f.sop_uid
                                         AND g.reason IS NULL)
               FROM files f WHERE f.reason IS NULL AND f.sop_uid IS NOT NULL AND f.key >
                   (SELECT MIN(g.key) FROM files g WHERE g.sop_uid = f.sop_uid AND g.reason IS NULL)
               ORDER BY f.key"""
        )

    def nifti_files(self) -> list[tuple[str, int, int]]:
        return self.db.execute(
            "SELECT key, size, mtime_ns FROM files WHERE reason IS NULL AND header IS NULL ORDER BY key"
        ).fetchall()

    def series_uids(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT series_uid FROM files WHERE reason IS NULL AND series_uid IS NOT NULL ORDER BY series_uid"
        )]

    def series_files(self, series_uid: str, skip: set[str]) -> list[tuple[str, int, int, InstanceHeader]]:
        """The usable files of one series with their headers (``skip``: keys not to use)."""
        return [
            (key, size, mtime, InstanceHeader.from_dict(json.loads(header)))
            for key, size, mtime, header in self.db.execute(
                "SELECT key, size, mtime_ns, header FROM files WHERE series_uid = ? AND reason IS NULL ORDER BY key",
                (series_uid,),
            )
            if key not in skip
        ]

    # -- the DICOM hierarchy ----------------------------------------------------------------
    def clear_hierarchy(self) -> None:
        with self.transaction() as db:
            for table in ("patients", "studies", "series", "instances"):
                db.execute(f"DELETE FROM {table}")

    def rebuild_objects(self) -> None:
        """Refill ``objects`` from the non-image files the scan catalogued."""
        with self.transaction() as db:
            db.execute("DELETE FROM objects")
            rows = db.execute(
                "SELECT key, header FROM files WHERE reason IS NOT NULL AND header IS NOT NULL"
            ).fetchall()
            for key, doc in rows:
                o = json.loads(doc)
                db.execute(
                    "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, o["sop_uid"], o["sop_class"], o["kind"], o["modality"], o["patient_id"],
                     o["study_uid"], o["series_uid"], o["series_description"], "\\".join(o["referenced_series"])),
                )

    def objects(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM objects ORDER BY patient_id, study_uid, path")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur]

    def add_hierarchy(self, used: list[tuple[str, int, int, InstanceHeader]]) -> None:
        """Add the usable files ``used`` (one series) to patients / studies / series / instances."""
        with self.transaction() as db:
            for key, size, mtime, h in used:
                db.execute("INSERT OR IGNORE INTO patients VALUES (?, ?)", (h.patient_id, h.patient_name))
                db.execute(
                    "INSERT OR IGNORE INTO studies VALUES (?, ?, ?, ?)",
                    (h.study_uid, h.patient_id, h.study_date, h.study_description),
                )
                db.execute(
                    "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?)",
                    (h.series_uid, h.study_uid, h.modality, h.series_number, h.series_description),
                )
                pos = "\\".join(f"{v:.4f}" for v in h.frames[0].ipp) if h.frames else ""
                db.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (h.sop_uid, key, size, mtime, h.series_uid, h.instance_number, pos, h.n_frames),
                )

    # -- output volumes ---------------------------------------------------------------------
    def volume(self, stack_id: str) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM volumes WHERE stack_id = ?", (stack_id,))
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([c[0] for c in cur.description], row))

    def put_volume(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO volumes ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [row[c] for c in cols],
            )

    def prune_volumes(self, keep: set[str]) -> list[dict[str, Any]]:
        """Drop volume rows not in ``keep``; return them (their files may need deleting)."""
        gone = [v for v in self.volumes() if v["stack_id"] not in keep]
        with self.transaction() as db:
            db.executemany("DELETE FROM volumes WHERE stack_id = ?", [(v["stack_id"],) for v in gone])
        return gone

    def volumes(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT * FROM volumes ORDER BY patient_id, study_uid, series_number, series_uid, part"
        )
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur]

    def counts(self) -> dict[str, int]:
        return {k: int(self.db.execute(sql).fetchone()[0]) for k, sql in _COUNTS.items()}


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeRow:
    """One output volume of ingest (a series, or one part of a split series)."""

    stack_id: str
    series_uid: str | None
    study_uid: str | None
    patient_id: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    part: str | None  # "" for a whole series
    n_files: int | None
    shape: str  # e.g. "256x256x32"; "" when no volume was written
    spacing: str  # e.g. "0.9x0.9x4"
    status: str  # ok / warning / rejected
    reasons: str  # "; "-joined
    volume: str  # NIfTI path relative to the ingest folder; "" when none
    sidecar: str  # JSON sidecar path relative to the ingest folder; "" when none
    preview: str
    input_hash: str | None
    files: str  # the source file keys, a JSON list (see source_keys)

    @property
    def dims(self) -> tuple[int, ...]:
        """The volume's shape as integers (``()`` when none was written)."""
        return tuple(int(s) for s in str(self.shape or "").split("x") if s)

    @property
    def source_keys(self) -> list[str]:
        """The source file keys (paths, or ``zip:archive.zip::member``) this volume was built from."""
        return split_keys(self.files)


@dataclass(frozen=True, slots=True)
class ObjectRow:
    """A non-image DICOM object (SEG, SR, RT structure set, ...) and the series it references."""

    path: str  # the file key (a path, or ``zip:archive.zip::member``; open it with dicom.sources.open_key)
    sop_uid: str | None
    sop_class: str | None
    kind: str | None
    modality: str | None
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    series_description: str | None
    referenced_series: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """A DICOM image series of the catalogued hierarchy."""

    series_uid: str
    study_uid: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """A usable DICOM image instance (file) of a series."""

    sop_uid: str
    path: str  # the file key (a path, or ``zip:archive.zip::member``; open it with dicom.sources.open_key)
    size: int | None
    mtime_ns: int | None
    series_uid: str | None
    instance_number: int | None
    position: str | None  # ImagePositionPatient of the first frame, "\\"-joined
    n_frames: int | None


def _columns(row_type: type) -> str:
    return ", ".join(row_type.__dataclass_fields__)


_VOLUMES = f"SELECT {_columns(VolumeRow)} FROM volumes"
_VOLUME_ORDER = " ORDER BY patient_id, study_uid, series_number, series_uid, part"
_OBJECTS = (f"SELECT {_columns(ObjectRow)} FROM objects")
_OBJECT_ORDER = " ORDER BY patient_id, study_uid, path"


class CatalogReader:
    """Read-only queries on an ingest catalog (see :func:`open_catalog`)."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        self.path = path / CATALOG_FILE if path.is_dir() else path
        if not self.path.is_file():
            where = path if path.is_dir() else self.path.parent
            raise CatalogError(f"{where} has no {CATALOG_FILE}: run the ingest stage (or 'medpipe ingest') first",
                               hint="run `medpipe ingest SRC --out DIR` first")
        self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
        try:
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError as exc:  # pragma: no cover - needs a read-only file system
                if "unable to open" not in str(exc):
                    raise
                # a WAL catalog on a read-only folder or medium, where SQLite cannot create its -shm
                # index: nobody can write there either, so read the file as it is
                db.close()
                db = sqlite3.connect(f"{uri}?immutable=1", uri=True)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as exc:
            db.close()
            raise CatalogError(f"{self.path}: cannot read the ingest catalog ({exc}); re-run the ingest stage") from exc
        if row is None or row[0] != str(SCHEMA_VERSION):
            db.close()
            raise CatalogError(f"{self.path}: catalog schema {row[0] if row else 'unknown'}, this medpipe reads "
                               f"{SCHEMA_VERSION}; re-run the ingest stage (or 'medpipe ingest') on this folder")
        return db

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise CatalogError(f"{self.path}: cannot read the ingest catalog ({exc}); re-run the ingest stage") from exc

    # -- queries
    def volumes(self, *, patient_id: str | None = None, study_uid: str | None = None,
                series_uid: str | None = None) -> list[VolumeRow]:
        """Output volumes (every status), ordered by patient, study, series number, series, part."""
        where, args = _where(patient_id=patient_id, study_uid=study_uid, series_uid=series_uid)
        return [VolumeRow(*r) for r in self._rows(_VOLUMES + where + _VOLUME_ORDER, args)]

    def objects(self, *, study_uid: str | None = None, modality: str | None = None) -> list[ObjectRow]:
        """Non-image objects, ordered by patient, study, path."""
        where, args = _where(study_uid=study_uid, modality=modality)
        return [_object(r) for r in self._rows(_OBJECTS + where + _OBJECT_ORDER, args)]

    def objects_referencing(self, series_uid: str, *, modality: str | None = None) -> list[ObjectRow]:
        """Non-image objects (e.g. ``modality="SEG"``) that reference the series ``series_uid``."""
        where, args = _where(modality=modality)
        where += (" AND" if where else " WHERE") + " instr(referenced_series, ?) > 0"
        rows = [_object(r) for r in self._rows(_OBJECTS + where + _OBJECT_ORDER, (*args, series_uid))]
        return [o for o in rows if series_uid in o.referenced_series]

    def series(self, series_uid: str) -> SeriesRow | None:
        rows = self._rows(f"SELECT {_columns(SeriesRow)} FROM series WHERE series_uid = ?", (series_uid,))
        return SeriesRow(*rows[0]) if rows else None

    def study_series(self, study_uid: str) -> list[SeriesRow]:
        """The image series of a study, by series number."""
        return [SeriesRow(*r) for r in self._rows(
            f"SELECT {_columns(SeriesRow)} FROM series WHERE study_uid = ? ORDER BY series_number, series_uid",
            (study_uid,))]

    def instances(self, series_uid: str) -> list[InstanceRow]:
        """The usable image instances of a series, by instance number."""
        return [InstanceRow(*r) for r in self._rows(
            f"SELECT {_columns(InstanceRow)} FROM instances WHERE series_uid = ? ORDER BY instance_number, path",
            (series_uid,))]

    def source_instances(self, series_uid: str) -> dict[str, str]:
        """SOP Instance UID -> file key of a series' instances (open a key with ``dicom.sources.open_key``)."""
        return {i.sop_uid: i.path for i in self.instances(series_uid)}

    def counts(self) -> dict[str, int]:
        """Rows per table: patients, studies, series, instances, files, rejected_files, volumes (not rejected)."""
        return {k: int(self._rows(sql)[0][0]) for k, sql in _COUNTS.items()}


def open_catalog(path: Path | str) -> CatalogReader:
    """Open an ingest catalog read-only: ``path`` is the ingest output folder or its ``catalog.sqlite``.

    Raises:
        CatalogError: there is no catalog (it is never created), or it cannot be read (one line).
    """
    return CatalogReader(path)


def _where(**conditions: str | None) -> tuple[str, tuple[str, ...]]:
    used = {k: v for k, v in conditions.items() if v is not None}
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(f"{k} = ?" for k in used), tuple(used.values())


def _object(r: tuple[Any, ...]) -> ObjectRow:
    return ObjectRow(*r[:-1], referenced_series=tuple(s for s in (r[-1] or "").split("\\") if s))
