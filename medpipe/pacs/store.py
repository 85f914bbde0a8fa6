"""Where received instances go: ``ROOT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

A file is written under a temporary name and renamed (:func:`medpipe.io.atomic_path`), so a file under
its final name is always complete: "present" means "done", which is what makes a pull resumable.
UIDs come from the network: anything that is not a plain UID (digits and dots, 64 at most) is replaced
by a hash, so a hostile value such as ``../../x`` can never leave ``ROOT``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from medpipe.io import atomic_path, remove_stale_temporaries
from medpipe.pacs.query import valid_uid

SUFFIX = ".dcm"
#: where dcmtk receives before each file is placed (medpipe.pacs.dcmtk); removed by :meth:`InstanceStore.clean`
STAGING = ".medpipe-staging"


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, implementation_uid: str,
                  implementation_version: str = "", source_ae: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (explicit VR little endian) of a Part 10 file.

    What pydicom's ``write_file_meta_info`` writes for the same elements (a test holds the two equal),
    without building and validating a Dataset per received instance: on a busy storage SCP that cost
    more than the rest of the handler.
    """
    def element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        if len(value) % 2:
            value += pad
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        element(0x0002, b"UI", sop_class.encode("ascii"), b"\0"),
        element(0x0003, b"UI", sop_instance.encode("ascii"), b"\0"),
        element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\0"),
        element(0x0012, b"UI", implementation_uid.encode("ascii"), b"\0"),
        element(0x0013, b"SH", implementation_version.encode("ascii"), b" ") if implementation_version else b"",
        element(0x0016, b"AE", source_ae.encode("ascii"), b" ") if source_ae else b"",
    ))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def safe_component(uid: str) -> str:
    uid = uid.strip().rstrip("\0").strip()
    if valid_uid(uid):
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()[:24]


class InstanceStore:
    """A folder of received instances; thread-safe (one C-STORE handler thread per association)."""

    def __init__(self, root: Path | str, on_write: Callable[[Path], None] | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.written = 0  # files written by this object
        self.bytes = 0
        self.on_write = on_write  # called after each new file (from the receiving thread)

    def clean(self) -> int:
        """Remove temporaries a killed run left behind (and dcmtk's staging folder); return how many files."""
        staging = self.root / STAGING
        n = sum(1 for p in staging.rglob("*") if p.is_file()) if staging.is_dir() else 0
        shutil.rmtree(staging, ignore_errors=True)
        return n + remove_stale_temporaries(self.root)

    def study_folder(self, study_uid: str) -> Path:
        return self.root / safe_component(study_uid)

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.study_folder(study_uid) / safe_component(series_uid)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.series_folder(study_uid, series_uid) / (safe_component(sop_uid) + SUFFIX)

    def present(self, study_uid: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs already stored for a series (file names; complete by construction)."""
        folder = self.series_folder(study_uid, series_uid)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return set()
        return {n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX) and not n.startswith(".")}

    def has(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        return self.path_for(study_uid, series_uid, sop_uid).is_file()

    def write(self, study_uid: str, series_uid: str, sop_uid: str, *parts: bytes | bytearray | memoryview) -> Path:
        """Store one instance (a whole Part 10 file, given in ``parts``) atomically; an existing file is kept."""
        target = self.path_for(study_uid, series_uid, sop_uid)
        if target.is_file():
            return target
        size = 0
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            for part in parts:
                size += fh.write(part)
        with self._lock:
            self.written += 1
            self.bytes += size
        if self.on_write is not None:
            self.on_write(target)
        return target

    def place(self, study_uid: str, series_uid: str, sop_uid: str, complete: Path) -> bool:
        """Move a complete Part 10 file (on the same file system) to its place with ``os.replace``; one already
        there is kept and ``complete`` removed. True when placed."""
        target = self.path_for(study_uid, series_uid, sop_uid)
        if target.is_file():
            complete.unlink()
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        size = complete.stat().st_size
        os.replace(complete, target)
        with self._lock:
            self.written += 1
            self.bytes += size
        if self.on_write is not None:
            self.on_write(target)
        return True

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*" + SUFFIX) if not p.name.startswith("."))
