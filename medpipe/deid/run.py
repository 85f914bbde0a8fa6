"""``medpipe deid``: a de-identified copy of a folder / zip / DICOMDIR export.

Flow: list the source files -> skip those a previous run already finished (journal) -> read, check
burned-in text, de-identify (:class:`~medpipe.deid.engine.Deidentifier`) and write each file, in worker
processes -> merge what was learnt into the private map -> ``rejected.csv`` and ``deid.json``.

Output folder ``OUT`` (nothing in it identifies a patient, so it can be shared as a whole)::

    OUT/<pseudonymous PatientID>/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm
    OUT/rejected.csv      file, reason   (file: the keyed reference F<16 hex>; the map holds its source path)
    OUT/deid.json         key id, profile and options, table edition, counts
    OUT/.deid-journal.jsonl   what is done (file references, sizes, output paths), for resuming

Every source file is written or listed in ``rejected.csv``. Source files are only read; outputs are written
atomically; a killed run is finished by running it again (same key and options; a different key or profile
for an existing ``OUT`` is refused). The key file and the map must not be inside ``OUT``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medpipe.deid.engine import Deidentifier, Mapping, Pseudonym
from medpipe.deid.keys import DeidKey, load_or_create_key
from medpipe.deid.mapping import MapBuilder, default_map_path, merge_into_map, read_map, read_patient_csv
from medpipe.deid.table import ProfileOptions, load_table
from medpipe.dicom.sources import ZIP_SEP, SourceFile, list_source, open_key
from medpipe.errors import ConfigError, SourceError
from medpipe.io import remove_stale_temporaries, write_csv_atomic, write_text_atomic

log = logging.getLogger(__name__)

JOURNAL = ".deid-journal.jsonl"
SUMMARY = "deid.json"
REJECTED = "rejected.csv"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: the map (and then the journal) is brought up to date at least this often during a run
_FLUSH_SECONDS = 5.0


class ProgressSink(Protocol):
    def start(self, phase: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class _NoProgress:
    def start(self, phase: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass(frozen=True)
class DeidSettings:
    """Everything a de-identification run needs besides source and output."""

    key: Path
    map: Path | None = None  # default: beside the key (mapping.default_map_path)
    options: ProfileOptions = field(default_factory=ProfileOptions)
    patients: Path | None = None  # a user's patient mapping CSV
    allow_burned_in: bool = False
    ocr: bool = False

    @property
    def map_path(self) -> Path:
        return Path(self.map).expanduser() if self.map else default_map_path(self.key)


@dataclass
class FileResult:
    ref: str
    size: int
    mtime_ns: int
    status: str  # written | rejected
    out: str = ""  # output path relative to OUT
    reason: str = ""
    mapping: Mapping | None = None


@dataclass
class DeidReport:
    out: Path
    map_path: Path
    key_created: bool
    n_files: int
    n_done: int  # processed this run (the rest were finished by an earlier run)
    written: int
    rejected: list[tuple[str, str]]  # (file reference, reason)
    seconds: float
    rejected_paths: dict[str, str] = field(default_factory=dict)  # file reference -> source path (for the console)


# -- one file (in worker processes) -----------------------------------------------------------


class _Worker:
    def __init__(self, key: DeidKey, options: ProfileOptions, patients: dict[str, Pseudonym], out: str,
                 allow_burned_in: bool, ocr: bool) -> None:
        self.engine = Deidentifier(key, options, patients)
        self.out = Path(out)
        self.allow_burned_in = allow_burned_in
        self.tesseract: str | None = None
        if ocr:
            from medpipe.deid.burned_in import tesseract_path

            self.tesseract = tesseract_path()

    def process(self, f: SourceFile, ref: str) -> FileResult:
        def rejected(reason: str) -> FileResult:
            return FileResult(ref, f.size, f.mtime_ns, "rejected", reason=reason)

        import pydicom
        from pydicom.errors import InvalidDicomError

        if f.size < 0:
            return rejected("listed in DICOMDIR but missing on disk")
        if f.size == 0:
            return rejected("empty file (0 bytes)")
        try:
            with open_key(f.key) as fh:
                ds = pydicom.dcmread(fh)
                ds.PixelData if "PixelData" in ds else None  # noqa: B018 - read deferred pixels now
        except InvalidDicomError:
            return rejected("not a DICOM file")
        except Exception as exc:  # noqa: BLE001 - corrupt input: reason only (messages may quote values)
            return rejected(f"unreadable DICOM ({type(exc).__name__})")
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
            return rejected("DICOMDIR media directory: not copied (the output is a folder tree)")
        if not ds.get("SOPInstanceUID"):
            return rejected("no SOP Instance UID")
        if not self.allow_burned_in:
            from medpipe.deid.burned_in import burned_in_reason

            reason = burned_in_reason(ds)
            if reason:
                return rejected(f"quarantined: {reason}")
        if self.tesseract and "PixelData" in ds:
            from medpipe.deid.burned_in import ocr_reason

            try:
                reason = ocr_reason(ds, self.tesseract)
            except Exception as exc:  # noqa: BLE001 - undecodable pixels cannot be checked: do not pass them
                reason = f"pixel text check failed ({type(exc).__name__})"
            if reason:
                return rejected(f"quarantined: {reason}")
        try:
            mapping = self.engine.apply(ds)
            rel = output_path(ds)
            from medpipe.deid.writer import write_dicom
            from medpipe.io import atomic_path

            with atomic_path(self.out / rel) as tmp:
                write_dicom(tmp, ds)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the run
            log.debug("de-identification failed for %s (%s)", ref, type(exc).__name__)  # no message: it may quote PHI
            return rejected(f"could not de-identify ({type(exc).__name__})")
        return FileResult(ref, f.size, f.mtime_ns, "written", out=rel, mapping=mapping)


_WORKER: _Worker | None = None


def _init_worker(*args: Any) -> None:
    global _WORKER
    _WORKER = _Worker(*args)


def _process_chunk(items: list[tuple[SourceFile, str]]) -> list[FileResult]:
    import warnings

    assert _WORKER is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom chatter about odd values: the reasons are what matters
        return [_WORKER.process(f, ref) for f, ref in items]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64] or "unknown"


def output_path(ds: Any) -> str:
    """``<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` of a de-identified dataset."""
    parts = [
        _safe(str(ds.get("PatientID", "") or "unknown")),
        _safe(str(ds.get("StudyInstanceUID", "") or "no-study")),
        _safe(str(ds.get("SeriesInstanceUID", "") or "no-series")),
        _safe(str(ds.SOPInstanceUID)) + ".dcm",
    ]
    return "/".join(parts)


# -- the run ----------------------------------------------------------------------------------


def relative_source_path(key: str, src: Path) -> str:
    """How a source file is named in the map: its path relative to the source (zip: the member name)."""
    if ZIP_SEP in key:
        return key.split(ZIP_SEP, 1)[1]
    base = src.resolve()
    if base.is_file():
        base = base.parent
    try:
        return str(Path(key).resolve().relative_to(base))
    except ValueError:
        return key


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _summary(key: DeidKey, options: ProfileOptions) -> dict[str, Any]:
    import medpipe

    doc = load_table()
    return {
        "format": "medpipe-deid-output", "version": 1, "medpipe": medpipe.__version__, "key_id": key.key_id,
        "profile": "basic", "options": list(options.chosen), "table": doc["sources"],
    }


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        done[entry["ref"]] = entry
    return done


def _executor(workers: int, jobs: int, init_args: tuple[Any, ...]) -> Executor | None:
    if workers <= 1 or jobs < 2:
        return None
    ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=init_args)


def deidentify(
    src: Path | str,
    out: Path | str,
    settings: DeidSettings,
    *,
    workers: int | None = None,
    progress: ProgressSink | None = None,
    tree: str = "",
) -> DeidReport:
    """De-identify every file of ``src`` (folder, zip, DICOMDIR or file) into ``out``; see the module docstring.

    ``tree``: a subfolder of ``out`` for the DICOM files (the reports stay in ``out``).

    Raises:
        SourceError: ``src`` is unusable or holds no files.
        ConfigError: key, map or options do not fit (``out`` made with another key / profile, key or map inside
            ``out``, bad patient mapping).
    """
    t0 = time.perf_counter()
    progress = progress or _NoProgress()
    workers = workers or min(os.cpu_count() or 1, 8)
    src_path = Path(src).expanduser()
    out = Path(out).expanduser().resolve()
    files = list(list_source(src_path))
    if not files:
        raise SourceError(f"{src_path}: no files found", hint="point deid at a folder, zip or DICOMDIR with DICOM files")
    src_root = src_path.resolve() if src_path.is_dir() else src_path.resolve().parent
    if _inside(out, src_root) and src_path.is_dir():
        raise SourceError(f"{out}: the output folder must not be inside the source {src_path}")
    key_path = Path(settings.key).expanduser()
    map_path = settings.map_path
    for what, p in (("key file", key_path), ("map", map_path)):
        if _inside(p, out):
            raise ConfigError(f"{p}: the {what} must not be inside the output folder {out}",
                              hint="keep the key and the map apart from the data you share")
    key, created = load_or_create_key(key_path)
    if created:
        log.warning("created a new de-identification key in %s (mode 0600): keep it, and keep it private", key_path)
    if map_path.exists():
        read_map(map_path, key.key_id)  # a map of another key: refused before any file is written
    patients = read_patient_csv(settings.patients) if settings.patients else {}
    if settings.ocr:
        from medpipe.deid.burned_in import tesseract_path

        tesseract_path()  # fail now, not once per file

    out.mkdir(parents=True, exist_ok=True)
    summary = _summary(key, settings.options)
    summary_path = out / SUMMARY
    if summary_path.is_file():
        old = json.loads(summary_path.read_text(encoding="utf-8"))
        if old.get("key_id") != key.key_id or old.get("options") != summary["options"]:
            raise ConfigError(f"{out}: already holds data de-identified with another key or profile "
                              f"(key id {old.get('key_id')}, options {old.get('options')})",
                              hint="choose a new --out, or the same --key and --profile as before")
    remove_stale_temporaries(out)
    write_text_atomic(summary_path, json.dumps({**summary, "state": "running"}, indent=1) + "\n")

    journal_path = out / JOURNAL
    journal = _read_journal(journal_path)
    builder = MapBuilder()
    results: dict[str, FileResult] = {}
    todo: list[tuple[SourceFile, str]] = []
    for f in files:
        rel = relative_source_path(f.key, src_path)
        ref = key.file_ref(rel)
        builder.add_file(ref, rel)
        old_entry = journal.get(ref)
        # done: written before, and still there (files not written are tried again: the settings that
        # rejected them, such as --allow-burned-in, may have changed)
        if (old_entry and old_entry["size"] == f.size and old_entry["mtime_ns"] == f.mtime_ns
                and old_entry["status"] == "written" and (out / tree / old_entry["out"]).is_file()):
            results[ref] = FileResult(ref, f.size, f.mtime_ns, old_entry["status"], old_entry.get("out", ""),
                                      old_entry.get("reason", ""))
        else:
            todo.append((f, ref))

    progress.start("De-identifying", len(todo))
    init_args = (key, settings.options, patients, str(out / tree), settings.allow_burned_in, settings.ocr)
    chunk = 16
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    pool = _executor(workers, len(chunks), init_args)
    if pool is None:
        _init_worker(*init_args)
    pending_journal: list[FileResult] = []
    last_flush = time.monotonic()

    def flush() -> None:
        # the map first, then the journal: a file is only 'done' once its map entries are safe
        merge_into_map(map_path, key.key_id, builder)
        with open(journal_path, "a", encoding="utf-8") as fh:
            for r in pending_journal:
                fh.write(json.dumps({"ref": r.ref, "size": r.size, "mtime_ns": r.mtime_ns, "status": r.status,
                                     "out": r.out, "reason": r.reason}) + "\n")
        pending_journal.clear()
        builder.data["uids"].clear()

    try:
        mapped: Iterable[list[FileResult]] = pool.map(_process_chunk, chunks) if pool else map(_process_chunk, chunks)
        for rows in mapped:
            for r in rows:
                if r.mapping is not None:
                    builder.add(r.mapping)
                    r.mapping = None
                results[r.ref] = r
                pending_journal.append(r)
            progress.advance(len(rows))
            if time.monotonic() - last_flush > _FLUSH_SECONDS:
                flush()
                last_flush = time.monotonic()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        flush()

    # duplicates: two sources that name the same instance write one output file
    seen: dict[str, str] = {}
    for ref in sorted(results):
        r = results[ref]
        if r.status == "written":
            if r.out in seen:
                r.status, r.reason = "rejected", f"duplicate SOP Instance UID (same output file as {seen[r.out]})"
            else:
                seen[r.out] = ref
    rejected = sorted((r.ref, r.reason) for r in results.values() if r.status == "rejected")
    write_csv_atomic(out / REJECTED, [{"file": f, "reason": why} for f, why in rejected], ["file", "reason"])
    written = sum(1 for r in results.values() if r.status == "written")
    summary.update(state="complete", files=len(files), written=written, rejected=len(rejected))
    write_text_atomic(summary_path, json.dumps(summary, indent=1) + "\n")
    paths = {ref: rel for ref, rel in builder.data["files"].items() if any(ref == x for x, _ in rejected)}
    return DeidReport(out, map_path, created, len(files), len(todo), written, rejected,
                      time.perf_counter() - t0, paths)


def stage_for_ingest(src: Path, out: Path, settings: DeidSettings, *, workers: int | None = None,
                     progress: ProgressSink | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """``medpipe ingest --deidentify``: de-identify ``src`` into ``out/deidentified`` first.

    Ingest then reads only the de-identified copy (``out/deidentified/dicom``), so its catalog, manifest,
    sidecars, volume names, previews and logs see pseudonyms and new UIDs only. Returns that folder and the
    files not written, as ``(reference, reason)`` rows for ingest's ``rejected.csv``.
    """
    for what, p in (("key file", Path(settings.key).expanduser()), ("map", settings.map_path)):
        if _inside(p, out):
            raise ConfigError(f"{p}: the {what} must not be inside the output folder {out}",
                              hint="keep the key and the map apart from the data you share")
    report = deidentify(src, out / "deidentified", settings, workers=workers, progress=progress, tree="dicom")
    staged = out / "deidentified" / "dicom"
    staged.mkdir(parents=True, exist_ok=True)
    return staged, [(f"deid:{ref}", f"not de-identified: {reason}") for ref, reason in report.rejected]
