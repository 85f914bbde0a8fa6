"""``medpipe ingest``: turn a folder / zip / DICOMDIR of DICOM (and NIfTI) into checked volumes.

Flow: list the source files -> read new or changed headers (in parallel, cached in the catalog)
-> drop duplicate SOP instances -> group into series and split / order / check them -> build
each changed volume (in parallel) -> write ``manifest.csv`` and ``rejected.csv``.

Every file ends up either used by a volume or listed in ``rejected.csv`` with a reason; one bad
file never stops the run; source files are only ever opened for reading; outputs are written
atomically, so a killed run can simply be started again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from medpipe.catalog import Catalog, FileRow
from medpipe.dicom.header import NonImage, Rejected, read_header
from medpipe.dicom.series import Stack, group_stacks
from medpipe.dicom.sources import SourceFile, is_nifti, list_source, open_key
from medpipe.errors import SourceError
from medpipe.io import atomic_path, remove_stale_temporaries, write_csv_atomic

if TYPE_CHECKING:
    from medpipe.deid.run import DeidSettings

log = logging.getLogger(__name__)

#: bump when volume building changes, so cached volumes are rebuilt
BUILD_VERSION = "1"

MANIFEST_COLUMNS = [
    "series_uid", "study_uid", "patient_id", "modality", "series_number", "series_description", "part",
    "n_files", "shape", "spacing", "status", "reasons", "volume", "sidecar", "preview",
]


class ProgressSink(Protocol):
    def start(self, phase: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class _NoProgress:
    def start(self, phase: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class IngestReport:
    out: Path
    n_files: int
    n_read: int  # headers read this run (the rest came from the catalog)
    n_built: int  # volumes written this run (the rest were up to date)
    volumes: list[dict[str, Any]]
    rejected: list[tuple[str, str]]
    seconds: dict[str, float] = field(default_factory=dict)


# -- header scanning -----------------------------------------------------------------------


def _scan_one(f: SourceFile) -> FileRow:
    def rejected(reason: str) -> FileRow:
        return FileRow(f.key, f.size, f.mtime_ns, None, None, reason, None)

    if f.size < 0:
        return rejected("listed in DICOMDIR but missing on disk")
    if is_nifti(f.key):
        reason = _check_nifti(f.key)
        return rejected(reason) if reason else FileRow(f.key, f.size, f.mtime_ns, None, None, None, None)
    try:
        with open_key(f.key) as fh:
            header = read_header(fh, f.size)
    except NonImage as exc:  # explained like a rejection, and its identity kept for later stages
        doc = json.dumps(exc.info, separators=(",", ":"))
        return FileRow(f.key, f.size, f.mtime_ns, exc.info["sop_uid"] or None, None, str(exc), doc)
    except Rejected as exc:
        return rejected(str(exc))
    except OSError as exc:
        return rejected(f"unreadable file: {exc.strerror or exc}")
    # serialised here, in the worker, so the main process only inserts rows
    doc = json.dumps(header.to_dict(), separators=(",", ":"))
    return FileRow(f.key, f.size, f.mtime_ns, header.sop_uid, header.series_uid, None, doc)


def _scan_chunk(files: list[SourceFile]) -> list[FileRow]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom / nibabel chatter about odd files: we report reasons
        return [_scan_one(f) for f in files]


def _check_nifti(key: str) -> str | None:
    """Reason a NIfTI input cannot be used, or None."""
    import nibabel as nib
    import numpy as np

    try:
        img = cast(nib.Nifti1Image, nib.load(key))
    except Exception as exc:
        return f"unreadable NIfTI: {exc}"
    if len(img.shape) not in (2, 3, 4):
        return f"NIfTI with {len(img.shape)} dimensions is not supported"
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        return "NIfTI with a singular or non-finite affine"
    return None


# -- helpers -------------------------------------------------------------------------------


def _safe(text: str, limit: int = 48) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return text[:limit] or "unnamed"


def _hash(*parts: object) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _fmt(values: Iterable[float | int]) -> str:
    return "x".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values)


def _executor(workers: int, jobs: int) -> Executor | None:
    if workers <= 1 or jobs < 2:
        return None
    ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _volume_name(stack: Stack, suffix: str) -> str:
    h = stack.first
    parts = [f"{h.series_number:04d}" if h.series_number is not None else "0000", _safe(h.series_description)]
    if stack.part:
        parts.append(_safe(stack.part, 32))
    parts.append(hashlib.sha1(stack.stack_id.encode()).hexdigest()[:8])
    return f"volumes/{_safe(h.patient_id or 'unknown_patient')}/{'_'.join(parts)}{suffix}"


# -- volume building (runs in worker processes) ----------------------------------------------


def _build_stack(stack: Stack, out: str, rel: str, input_hash: str) -> dict[str, Any]:
    import warnings

    from medpipe.dicom.preview import write_preview
    from medpipe.dicom.volume import PixelReadErrors, build_volume, sidecar, write_nifti, write_sidecar

    h = stack.first
    row: dict[str, Any] = {
        "stack_id": stack.stack_id, "series_uid": stack.series_uid, "study_uid": h.study_uid,
        "patient_id": h.patient_id, "modality": h.modality, "series_number": h.series_number,
        "series_description": h.series_description, "part": stack.part, "n_files": len(stack.keys),
        "shape": "", "spacing": "", "status": stack.status, "reasons": "; ".join(stack.reasons),
        "volume": "", "sidecar": "", "preview": "", "input_hash": input_hash, "files": "\n".join(stack.keys),
    }
    if stack.status == "rejected":
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = build_volume(stack)
    except PixelReadErrors as exc:
        row["failed"] = [(e.key, str(e)) for e in exc.errors]
        return row
    tr = h.meta.get("RepetitionTime")
    write_nifti(volume, Path(out) / rel, tr_seconds=float(tr) / 1000 if tr else None)
    side_rel = re.sub(r"\.nii(\.gz)?$", ".json", rel)
    write_sidecar(Path(out) / side_rel, sidecar(stack, volume, {"SourceFiles": len(stack.keys)}))
    preview_rel = re.sub(r"\.nii(\.gz)?$", ".png", rel)
    title = " ".join(str(t) for t in (h.patient_id, h.series_number, h.series_description, stack.part) if t)
    write_preview(volume.data, volume.affine, Path(out) / preview_rel, title)
    row.update(
        shape=_fmt(volume.data.shape), spacing=_fmt(volume.spacing), volume=rel, sidecar=side_rel,
        preview=preview_rel,
    )
    return row


def _nifti_id(key: str) -> str:
    return "nifti-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _nifti_row(key: str, size: int, mtime_ns: int, out: Path) -> dict[str, Any]:
    import nibabel as nib

    img = cast(nib.Nifti1Image, nib.load(key))
    sid = _nifti_id(key)
    name = Path(key).name
    stem = re.sub(r"\.nii(\.gz)?$", "", name, flags=re.I)
    rel = f"volumes/nifti/{_safe(stem)}_{sid[6:14]}{'.nii.gz' if name.lower().endswith('.gz') else '.nii'}"
    with atomic_path(out / rel) as tmp:
        shutil.copyfile(key, tmp)
    status, reasons = "ok", ""
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        status, reasons = "warning", "NIfTI header has no orientation (sform and qform codes 0): affine is a guess"
    return {
        "stack_id": sid, "series_uid": sid, "study_uid": "", "patient_id": "", "modality": "",
        "series_number": None, "series_description": name, "part": "", "n_files": 1,
        "shape": _fmt(img.shape), "spacing": _fmt(float(z) for z in img.header.get_zooms()[:3]),
        "status": status, "reasons": reasons, "volume": rel, "sidecar": "", "preview": "",
        "input_hash": _hash(BUILD_VERSION, key, size, mtime_ns), "files": key,
    }


# -- the whole run ------------------------------------------------------------------------


def ingest(
    src: Path | str,
    out: Path | str,
    *,
    workers: int | None = None,
    compress: bool = True,
    progress: ProgressSink | None = None,
    deidentify: DeidSettings | None = None,
) -> IngestReport:
    """Ingest ``src`` (folder, zip, DICOMDIR, DICOM or NIfTI file) into the output folder ``out``.

    ``deidentify``: de-identify ``src`` first (:func:`medpipe.deid.run.stage_for_ingest`) and ingest only
    the de-identified copy, so nothing in ``out`` holds the source's PHI.

    Re-running on the same or an overlapping source is incremental: unchanged files are not
    re-read and unchanged volumes are not rebuilt.

    Raises:
        SourceError: ``src`` cannot be read at all, or holds no files.
    """
    progress = progress or _NoProgress()
    workers = workers or min(os.cpu_count() or 1, 8)
    out = Path(out).expanduser().resolve()
    src_path = Path(src).expanduser()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    deid_rejected: list[tuple[str, str]] = []
    if deidentify is not None:
        from medpipe.deid.run import stage_for_ingest

        src_path, deid_rejected = stage_for_ingest(src_path, out, deidentify, workers=workers, progress=progress)
    files = list(list_source(src_path))
    if not files:
        raise SourceError(f"{src_path}: no files found", hint="point ingest at a folder, zip or DICOMDIR with DICOM files")
    if out == src_path.resolve() or str(out).startswith(str(src_path.resolve()) + os.sep):
        raise SourceError(f"{out}: the output folder must not be inside the source {src_path}")
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(out)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", stale)
    catalog = Catalog(out / "catalog.sqlite")
    try:
        n_read = _scan(catalog, src_path, files, workers, progress)
        seconds["scan"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        volumes, rejected, n_built = _assemble(catalog, out, workers, compress, progress)
        rejected = sorted(rejected + deid_rejected)
        seconds["build"] = time.perf_counter() - t1
        _write_reports(out, volumes, rejected)
    finally:
        catalog.close()
    seconds["total"] = time.perf_counter() - t0
    return IngestReport(out, len(files), n_read, n_built, volumes, rejected, seconds)


def _scan(catalog: Catalog, src: Path, files: list[SourceFile], workers: int, progress: ProgressSink) -> int:
    known = catalog.known_files()
    todo = [f for f in files if known.get(f.key) != (f.size, f.mtime_ns)]
    # files that vanished from a re-scanned folder or archive leave the catalog
    if src.is_dir():
        prefix = str(src.resolve()) + os.sep
        present = {f.key for f in files}
        catalog.forget_files(k for k in known if k.startswith(prefix) and k not in present)
    progress.start("Reading headers", len(todo))
    chunk = 64
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    pool = _executor(workers, len(chunks))
    try:
        results = pool.map(_scan_chunk, chunks) if pool else map(_scan_chunk, chunks)
        for rows in results:
            catalog.put_files(rows)  # committed per chunk: a killed run keeps what it read
            progress.advance(len(rows))
    finally:
        if pool:
            pool.shutdown()
    return len(todo)


def _assemble(
    catalog: Catalog, out: Path, workers: int, compress: bool, progress: ProgressSink
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """Plan and build the volumes of every series in the catalog, one series at a time.

    Only one series' headers are loaded at a time and at most ``2 x workers`` builds are in
    flight, so memory is bounded by the largest series, not by the size of the export.
    """
    suffix = ".nii.gz" if compress else ".nii"
    rejected: list[tuple[str, str]] = list(catalog.rejected_files())
    duplicates = list(catalog.duplicate_files())
    skip = {key for key, _, _ in duplicates}
    rejected += [(key, f"duplicate SOP Instance UID {sop} (also in {kept})") for key, sop, kept in duplicates]
    series = catalog.series_uids()
    niftis = catalog.nifti_files()
    catalog.clear_hierarchy()
    catalog.rebuild_objects()
    progress.start("Building volumes", len(series) + len(niftis))

    found: dict[str, dict[str, Any]] = {}  # stack_id -> manifest row (a retried series re-plans its parts)
    n_built = 0
    attempts: dict[str, int] = {}
    queue = list(reversed(series))
    pending: dict[Future[dict[str, Any]], str] = {}
    pool = _executor(workers, len(series))
    runner: Executor = pool or _InlineExecutor()

    def plan(series_uid: str) -> None:
        used = catalog.series_files(series_uid, skip)
        if attempts.get(series_uid, 0) == 0:
            catalog.add_hierarchy(used)
        stat = {k: (size, mtime) for k, size, mtime, _ in used}
        for stack in group_stacks([(k, h) for k, _, _, h in used]):
            ihash = _hash(BUILD_VERSION, compress, stack.part, [(k, *stat[k]) for k in stack.keys])
            old = catalog.volume(stack.stack_id)
            if old and old["input_hash"] == ihash and all(
                (out / old[c]).is_file() for c in ("volume", "sidecar", "preview") if old[c]
            ):
                found[stack.stack_id] = old
            else:
                pending[runner.submit(_build_stack, stack, str(out), _volume_name(stack, suffix), ihash)] = series_uid
        progress.advance()

    def collect(block: bool) -> None:
        nonlocal n_built
        done, _ = wait(pending, return_when=FIRST_COMPLETED) if block else (list(pending), None)
        for fut in done:
            series_uid = pending.pop(fut)
            row = fut.result()
            failed = row.pop("failed", [])
            if failed:  # reject the unreadable files and plan the series again without them
                for key, reason in failed:
                    catalog.set_reason(key, reason)
                    rejected.append((key, reason))
                attempts[series_uid] = attempts.get(series_uid, 0) + 1
                if attempts[series_uid] < 3:
                    queue.append(series_uid)
                continue
            catalog.put_volume(row)
            n_built += bool(row["volume"])
            found[row["stack_id"]] = row

    try:
        while queue or pending:
            while queue and len(pending) < 2 * max(workers, 1):
                plan(queue.pop())
            if pending:
                collect(block=pool is not None)
    finally:
        if pool:
            pool.shutdown()
    for key, size, mtime in niftis:
        sid = _nifti_id(key)
        old = catalog.volume(sid)
        if old and old["input_hash"] == _hash(BUILD_VERSION, key, size, mtime) and (out / old["volume"]).exists():
            found[sid] = old
        else:
            found[sid] = _nifti_row(key, size, mtime, out)
            catalog.put_volume(found[sid])
            n_built += 1
        progress.advance()

    rows = list(found.values())
    for gone in catalog.prune_volumes(set(found)):
        for rel in (gone["volume"], gone["sidecar"], gone["preview"]):
            if rel and (out / rel).is_file():
                (out / rel).unlink()
    for r in rows:
        if r["status"] == "rejected":
            what = f"series {r['series_uid']}" + (f" [{r['part']}]" if r["part"] else "")
            rejected.extend((k, f"{what} rejected: {r['reasons']}") for k in r["files"].split("\n") if k)
    rows.sort(key=lambda r: (r["patient_id"] or "", r["study_uid"] or "", r["series_number"] or 0, r["series_uid"], r["part"]))
    rejected.sort()
    return rows, rejected, n_built


class _InlineExecutor(Executor):
    """Runs submitted work at once in this process (one worker, or a single job)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


def _write_reports(out: Path, volumes: list[dict[str, Any]], rejected: list[tuple[str, str]]) -> None:
    write_csv_atomic(out / "manifest.csv", volumes, MANIFEST_COLUMNS, ignore_extra=True)
    write_csv_atomic(out / "rejected.csv", [{"path": p, "reason": r} for p, r in rejected], ["path", "reason"])

