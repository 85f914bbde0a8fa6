"""Push DICOM files to a PACS: C-STORE (DIMSE) or STOW-RS (DICOMweb); and the results of ``medpipe score``.

C-STORE: files are grouped into associations of at most 128 presentation contexts; each SOP class is
offered in the transfer syntaxes of its files plus uncompressed (a compressed file whose syntax the PACS
refuses is decompressed and sent uncompressed). A SOP class the PACS refuses makes its files ``failed``
with the line "refused SOP class ..., enable it at the PACS or push with --via dicomweb". Transient
failures (connection refused or lost, out of resources) are retried with back-off, resending only the
files not yet stored.

STOW-RS sends the files' bytes unchanged in batches and reads the per-instance outcome from the
answer's Referenced / Failed SOP Sequences.

:func:`push_scored` pushes what ``medpipe score`` wrote (SEG, SR, Parametric Map, overlays) for the
studies scored ``ok`` and records each pushed file in ``push_status.sqlite``, so running it again pushes
only what is new or changed.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medpipe.errors import ConfigError, PacsError
from medpipe.pacs.dimse import association, lost, sop_name, status_text
from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.retry import with_retries

log = logging.getLogger("medpipe.pacs")

Via = Literal["dimse", "dicomweb"]
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
STOW_BATCH_FILES = 64
STOW_BATCH_BYTES = 64 << 20
PUSH_DB = "push_status.sqlite"
#: what ``medpipe score`` writes per study (scores.csv columns) that goes back to the PACS
RESULT_COLUMNS = ("seg", "sr", "map", "overlays")


@dataclass
class PushResult:
    path: Path
    sop_uid: str
    sop_class: str
    status: str = "pending"  # ok | warning | failed | pending
    detail: str = ""


@dataclass
class PushReport:
    node: str
    via: str
    results: list[PushResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def failed(self) -> list[PushResult]:
        return [r for r in self.results if r.status not in ("ok", "warning")]

    def raise_for_failures(self) -> None:
        bad = self.failed
        if bad:
            raise PacsError(f"{len(bad)} of {len(self.results)} file(s) not stored at {self.node}: {bad[0].detail} "
                            f"({bad[0].path.name})")


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def collect(paths: Iterable[Path | str]) -> list[Path]:
    """Files named, and the DICOM files (Part 10) under folders named (hidden and temporary files left out).

    A folder of ``medpipe score`` results also holds previews and CSV files: those are not pushed. A file
    named explicitly is kept whatever it is, so that a wrong one is reported.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                              and _is_part10(f)))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def _header(path: Path) -> tuple[str, str, str] | str:
    """(SOP class, SOP instance, transfer syntax) of a DICOM file, or why it cannot be pushed."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"not a readable DICOM file ({type(exc).__name__})"
    cls, inst = str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if not cls or not inst:
        return "no SOP Class / SOP Instance UID"
    return cls, inst, ts or "1.2.840.10008.1.2"


def push(node: PacsNode, files: Sequence[Path | str], *, via: Via | None = None) -> PushReport:
    """Send ``files`` to ``node``; every file gets a status (ok / warning / failed) in the report."""
    via = via or ("dimse" if node.has_dimse else "dicomweb")
    if via == "dimse":
        node.dimse_address()
    else:
        node.dicomweb_url()
    t0 = time.perf_counter()
    report = PushReport(node.name, via)
    meta: dict[int, tuple[str, str, str]] = {}
    for path in map(Path, files):
        h = _header(path)
        if isinstance(h, str):
            report.results.append(PushResult(path, "", "", "failed", h))
        else:
            meta[len(report.results)] = h
            report.results.append(PushResult(path, h[1], h[0]))
    todo = [(report.results[i], m) for i, m in meta.items()]
    if todo:
        if via == "dimse":
            _push_dimse(node, todo)
        else:
            _push_stow(node, todo)
    report.seconds = time.perf_counter() - t0
    return report


# -- C-STORE ------------------------------------------------------------------------------------------


def _batches(todo: list[tuple[PushResult, tuple[str, str, str]]]) -> list[list[tuple[PushResult, tuple[str, str, str]]]]:
    """Groups of files whose presentation contexts fit one association (128 at most)."""
    batches: list[list[tuple[PushResult, tuple[str, str, str]]]] = []
    contexts: set[tuple[str, str]] = set()
    current: list[tuple[PushResult, tuple[str, str, str]]] = []
    for r, (cls, inst, ts) in todo:
        need = {(cls, ts), (cls, "uncompressed")}
        if current and len(contexts | need) > 128:
            batches.append(current)
            current, contexts = [], set()
        current.append((r, (cls, inst, ts)))
        contexts |= need
    if current:
        batches.append(current)
    return batches


def _contexts(batch: list[tuple[PushResult, tuple[str, str, str]]]) -> list[Any]:
    from pynetdicom import build_context

    out = []
    seen: set[tuple[str, str]] = set()
    for _, (cls, _, ts) in batch:
        for key, syntaxes in (((cls, "uncompressed"), list(UNCOMPRESSED)), ((cls, ts), [ts])):
            if key not in seen and not (ts in UNCOMPRESSED and key[1] == ts):
                seen.add(key)
                out.append(build_context(cls, syntaxes))
    return out


def _push_dimse(node: PacsNode, todo: list[tuple[PushResult, tuple[str, str, str]]]) -> None:
    for batch in _batches(todo):
        with_retries(lambda batch=batch: _store_batch(node, batch), retries=node.retries,
                     first_delay=node.retry_delay, what=f"C-STORE to {node.name}")


def _store_batch(node: PacsNode, batch: list[tuple[PushResult, tuple[str, str, str]]]) -> None:
    import pydicom

    what = f"C-STORE to {node.name}"
    left = [(r, m) for r, m in batch if r.status == "pending"]
    if not left:
        return
    with contextlib.ExitStack() as stack:
        try:
            assoc = stack.enter_context(association(node, _contexts(left), what=what))
        except PacsError as exc:
            if exc.transient:
                raise
            for r, _ in left:  # e.g. every SOP class of the batch refused: each file says so
                r.status, r.detail = "failed", str(exc)
            return
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        for r, (cls, _, ts) in left:
            syntaxes = accepted.get(cls)
            if not syntaxes:
                r.status, r.detail = "failed", (f"{node.name} refused SOP class {sop_name(cls)}: enable it at the "
                                                "PACS, or push with --via dicomweb")
                continue
            ds = pydicom.dcmread(r.path)
            if ts not in syntaxes and ts not in UNCOMPRESSED:
                try:
                    ds.decompress()
                except Exception as exc:  # no decoder for this syntax
                    r.status, r.detail = "failed", (f"{node.name} does not accept transfer syntax {sop_name(ts)} for "
                                                    f"{sop_name(cls)} and the file cannot be decompressed ({exc})")
                    continue
            started = time.monotonic()
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise lost(node, assoc, what, answered=True, started=started)
            code = int(status.Status)
            if code == 0x0000:
                r.status = "ok"
            elif 0xB000 <= code <= 0xBFFF or code == 0x0001:
                r.status, r.detail = "warning", f"status 0x{code:04X} ({status_text(code)})"
            elif 0xA700 <= code <= 0xA7FF:
                raise PacsError(f"{what}: {node.name} is out of resources (status 0x{code:04X}); try again later",
                                transient=True)
            else:
                comment = str(status.get("ErrorComment", "") or "")
                r.status, r.detail = "failed", (f"{node.name} refused the instance: status 0x{code:04X} "
                                                f"({status_text(code)}){': ' + comment if comment else ''}")


# -- STOW-RS ------------------------------------------------------------------------------------------


FAILURE_REASONS = {0x0122: "refused SOP class", 0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                   0xC000: "cannot understand", 0xC122: "refused SOP class", 0xC123: "refused transfer syntax"}


def _push_stow(node: PacsNode, todo: list[tuple[PushResult, tuple[str, str, str]]]) -> None:
    from medpipe.pacs.web import client

    c = client(node)
    batch: list[PushResult] = []
    size = 0
    for r, _ in todo:
        batch.append(r)
        size += r.path.stat().st_size
        if len(batch) >= STOW_BATCH_FILES or size >= STOW_BATCH_BYTES:
            with_retries(lambda b=batch: _stow_batch(node, c, b), retries=node.retries, first_delay=node.retry_delay,
                         what=f"STOW-RS to {node.name}")
            batch, size = [], 0
    if batch:
        with_retries(lambda b=batch: _stow_batch(node, c, b), retries=node.retries, first_delay=node.retry_delay,
                     what=f"STOW-RS to {node.name}")


def _stow_batch(node: PacsNode, c: Any, batch: list[PushResult]) -> None:
    from medpipe.pacs.web import stow

    left = [r for r in batch if r.status == "pending"]
    if not left:
        return
    answer = stow(node, c, [r.path.read_bytes() for r in left])
    by_uid = {r.sop_uid: r for r in left}
    for item in answer.get("FailedSOPSequence", []) or []:
        r = by_uid.get(str(item.get("ReferencedSOPInstanceUID", "")))
        if r is not None:
            code = int(item.get("FailureReason", 0xC000) or 0xC000)
            reason = FAILURE_REASONS.get(code, status_text(code))
            r.status = "failed"
            r.detail = f"{node.name} refused the instance over STOW-RS: 0x{code:04X} ({reason})"
            if "SOP class" in reason:
                r.detail += f": enable {sop_name(r.sop_class)} at the PACS"
    for item in answer.get("ReferencedSOPSequence", []) or []:
        r = by_uid.get(str(item.get("ReferencedSOPInstanceUID", "")))
        if r is not None and r.status == "pending":
            r.status = "warning" if item.get("WarningReason") else "ok"
    for r in left:
        if r.status == "pending":  # a server that answers 200 without listing the instances
            r.status, r.detail = "ok", "accepted (not listed in the STOW-RS answer)"


# -- results of medpipe score ---------------------------------------------------------------------------


def result_files(out: Path, rows: Iterable[dict[str, Any]]) -> list[Path]:
    """The DICOM results of the ``ok`` rows of a scoring run in ``out`` (paths in the row are relative to it)."""
    files: list[Path] = []
    for row in rows:
        if row.get("status") != "ok":
            continue
        for col in RESULT_COLUMNS:
            for rel in str(row.get(col) or "").split(";"):
                if rel.strip():
                    files.append(out / rel.strip())
    return files


class PushLog:
    """Which result files were pushed to which node (``push_status.sqlite`` beside the results)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS pushed (node TEXT NOT NULL, path TEXT NOT NULL, "
                        "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, PRIMARY KEY (node, path))")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def pending(self, node: str, files: Iterable[Path]) -> list[Path]:
        out = []
        for f in files:
            got = self.db.execute("SELECT size, mtime_ns FROM pushed WHERE node = ? AND path = ?",
                                  (node, str(f))).fetchone()
            if got is None or tuple(got) != self._stamp(f):
                out.append(f)
        return out

    def record(self, node: str, files: Iterable[Path]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO pushed VALUES (?, ?, ?, ?)",
                            [(node, str(f), *self._stamp(f)) for f in files])
        self.db.commit()


def push_scored(node: PacsNode, out: Path, rows: Iterable[dict[str, Any]], *, via: Via | None = None) -> PushReport:
    """Push the results of the ``ok`` studies in ``rows`` not yet pushed to ``node``; record what was stored."""
    files = [f for f in result_files(out, rows) if f.is_file()]
    log_db = PushLog(out / PUSH_DB)
    try:
        todo = log_db.pending(node.name, files)
        report = push(node, todo, via=via) if todo else PushReport(node.name, via or "dimse")
        log_db.record(node.name, [r.path for r in report.results if r.status in ("ok", "warning")])
    finally:
        log_db.close()
    return report
