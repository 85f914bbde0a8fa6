"""``medpipe ingest``: turn a folder / zip / DICOMDIR of DICOM (and NIfTI) into checked volumes.

Flow: list the source files -> read new or changed headers (in parallel, cached in the catalog)
-> drop duplicate SOP instances -> group into series and split / order / check them -> build
each changed volume (in parallel) -> write ``manifest.csv`` and ``rejected.csv``.

Every file ends up either used by a volume or listed in ``rejected.csv`` with a reason; one bad
file never stops the run; source files are only ever opened for reading; outputs are written
atomically, so a killed run can simply be started again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medpipe.catalog import Catalog, FileRow
from medpipe.dicom.header import InstanceHeader, Rejected, read_header
from medpipe.dicom.series import Stack, group_stacks
from medpipe.dicom.sources import SourceFile, is_nifti, list_source, open_key
from medpipe.errors import SourceError
from medpipe.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

#: bump when volume building changes, so cached volumes are rebuilt
BUILD_VERSION = "1"

MANIFEST_COLUMNS = [
    "series_uid", "study_uid", "patient_id", "modality", "series_number", "series_description", "part",
    "n_files", "shape", "spacing", "status", "reasons", "volume", "sidecar",
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
    if f.size < 0:
        return FileRow(f.key, f.size, f.mtime_ns, None, "listed in DICOMDIR but missing on disk", None)
    if is_nifti(f.key):
        return FileRow(f.key, f.size, f.mtime_ns, None, _check_nifti(f.key), None)
    try:
        with open_key(f.key) as fh:
            header = read_header(fh, f.size)
    except Rejected as exc:
        return FileRow(f.key, f.size, f.mtime_ns, None, str(exc), None)
    except OSError as exc:
        return FileRow(f.key, f.size, f.mtime_ns, None, f"unreadable file: {exc.strerror or exc}", None)
    return FileRow(f.key, f.size, f.mtime_ns, header.sop_uid, None, header)


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
        img = nib.load(key)
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

    from medpipe.dicom.volume import PixelReadErrors, build_volume, sidecar, write_nifti, write_sidecar

    h = stack.first
    row: dict[str, Any] = {
        "stack_id": stack.stack_id, "series_uid": stack.series_uid, "study_uid": h.study_uid,
        "patient_id": h.patient_id, "modality": h.modality, "series_number": h.series_number,
        "series_description": h.series_description, "part": stack.part, "n_files": len(stack.keys),
        "shape": "", "spacing": "", "status": stack.status, "reasons": "; ".join(stack.reasons),
        "volume": "", "sidecar": "", "input_hash": input_hash, "files": "\n".join(stack.keys),
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
    row.update(
        shape=_fmt(volume.data.shape), spacing=_fmt(volume.spacing), volume=rel, sidecar=side_rel,
    )
    return row


def _nifti_row(f: FileRow, out: Path) -> dict[str, Any]:
    import nibabel as nib

    img = nib.load(f.key)
    sid = "nifti-" + hashlib.sha1(f.key.encode()).hexdigest()[:16]
    name = Path(f.key).name
    stem = re.sub(r"\.nii(\.gz)?$", "", name, flags=re.I)
    rel = f"volumes/nifti/{_safe(stem)}_{sid[6:14]}{'.nii.gz' if name.lower().endswith('.gz') else '.nii'}"
    with atomic_path(out / rel) as tmp:
        shutil.copyfile(f.key, tmp)
    status, reasons = "ok", ""
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        status, reasons = "warning", "NIfTI header has no orientation (sform and qform codes 0): affine is a guess"
    return {
        "stack_id": sid, "series_uid": sid, "study_uid": "", "patient_id": "", "modality": "",
        "series_number": None, "series_description": name, "part": "", "n_files": 1,
        "shape": _fmt(img.shape), "spacing": _fmt(float(z) for z in img.header.get_zooms()[:3]),
        "status": status, "reasons": reasons, "volume": rel, "sidecar": "",
        "input_hash": _hash(BUILD_VERSION, f.key, f.size, f.mtime_ns), "files": f.key,
    }


# -- the whole run ------------------------------------------------------------------------


def ingest(
    src: Path | str,
    out: Path | str,
    *,
    workers: int | None = None,
    compress: bool = True,
    progress: ProgressSink | None = None,
) -> IngestReport:
    """Ingest ``src`` (folder, zip, DICOMDIR, DICOM or NIfTI file) into the output folder ``out``.

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
    files = list(list_source(src_path))
    if not files:
        raise SourceError(f"{src_path}: no files found", hint="point ingest at a folder, zip or DICOMDIR with DICOM files")
    if out == src_path.resolve() or str(out).startswith(str(src_path.resolve()) + os.sep):
        raise SourceError(f"{out}: the output folder must not be inside the source {src_path}")
    out.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(out / "catalog.sqlite")
    try:
        n_read = _scan(catalog, src_path, files, workers, progress)
        seconds["scan"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        volumes, rejected, n_built = _assemble(catalog, out, workers, compress, progress)
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
    suffix = ".nii.gz" if compress else ".nii"
    n_built = 0
    for _attempt in range(3):  # files whose pixels fail are rejected and their series regrouped
        rejected: list[tuple[str, str]] = []
        used: list[tuple[str, int, int, InstanceHeader]] = []
        niftis: list[FileRow] = []
        first_key: dict[str, str] = {}
        for row in catalog.files():
            if row.reason is not None:
                rejected.append((row.key, row.reason))
            elif row.header is None:
                niftis.append(row)
            elif row.header.sop_uid in first_key:
                rejected.append((row.key, f"duplicate SOP Instance UID {row.header.sop_uid} (also in {first_key[row.header.sop_uid]})"))
            else:
                first_key[row.header.sop_uid] = row.key
                used.append((row.key, row.size, row.mtime_ns, row.header))
        catalog.rebuild_hierarchy(used)
        stat = {k: (s, m) for k, s, m, _ in used}
        stacks = group_stacks([(k, h) for k, _, _, h in used])

        rows: list[dict[str, Any]] = []
        todo: list[tuple[Stack, str, str]] = []
        for stack in stacks:
            ihash = _hash(BUILD_VERSION, compress, stack.part, [(k, *stat[k]) for k in stack.keys])
            old = catalog.volume(stack.stack_id)
            if old and old["input_hash"] == ihash and all((out / old[c]).is_file() for c in ("volume", "sidecar") if old[c]):
                rows.append(old)
            else:
                todo.append((stack, str(out), _volume_name(stack, suffix), ihash))  # type: ignore[arg-type]
        progress.start("Building volumes", len(todo) + len(niftis))
        failed: list[tuple[str, str]] = []
        pool = _executor(workers, len(todo))
        try:
            results = (
                pool.map(_build_stack, *zip(*todo)) if pool and todo else (_build_stack(*t) for t in todo)
            )
            for row in results:
                failed.extend(row.pop("failed", []))
                if row["volume"] or row["status"] == "rejected":
                    catalog.put_volume(row)
                    n_built += bool(row["volume"])
                rows.append(row)
                progress.advance()
        finally:
            if pool:
                pool.shutdown()
        for f in niftis:
            old = catalog.volume("nifti-" + hashlib.sha1(f.key.encode()).hexdigest()[:16])
            row = old if old and old["input_hash"] == _hash(BUILD_VERSION, f.key, f.size, f.mtime_ns) and (out / old["volume"]).exists() else None
            if row is None:
                row = _nifti_row(f, out)
                catalog.put_volume(row)
                n_built += 1
            rows.append(row)
            progress.advance()
        if not failed:
            break
        for key, reason in failed:
            catalog.set_reason(key, reason)
    keep = {r["stack_id"] for r in rows}
    for gone in catalog.prune_volumes(keep):
        for rel in (gone["volume"], gone["sidecar"]):
            if rel and (out / rel).is_file():
                (out / rel).unlink()
    for r in rows:
        if r["status"] == "rejected":
            what = f"series {r['series_uid']}" + (f" [{r['part']}]" if r["part"] else "")
            rejected.extend((k, f"{what} rejected: {r['reasons']}") for k in r["files"].split("\n") if k)
    rows.sort(key=lambda r: (r["patient_id"] or "", r["study_uid"] or "", r["series_number"] or 0, r["series_uid"], r["part"]))
    rejected.sort()
    return rows, rejected, n_built


def _write_reports(out: Path, volumes: list[dict[str, Any]], rejected: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(volumes)
    write_text_atomic(out / "manifest.csv", buf.getvalue())
    buf = io.StringIO()
    w2 = csv.writer(buf, lineterminator="\n")
    w2.writerow(["path", "reason"])
    w2.writerows(rejected)
    write_text_atomic(out / "rejected.csv", buf.getvalue())

