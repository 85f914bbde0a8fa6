"""Where received instances go: ``ROOT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

A file is written under a temporary name and renamed (:func:`medpipe.io.atomic_path`), so a file under
its final name is always complete: "present" means "done", which is what makes a pull resumable.
UIDs come from the network: anything that is not a plain UID (digits and dots, 64 at most) is replaced
by a hash, so a hostile value such as ``../../x`` can never leave ``ROOT``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from medpipe.io import atomic_path, remove_stale_temporaries
from medpipe.pacs.query import valid_uid

SUFFIX = ".dcm"


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
        """Remove temporaries a killed run left behind; return how many."""
        return remove_stale_temporaries(self.root)

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.root / safe_component(study_uid) / safe_component(series_uid)

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

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes | bytearray | memoryview) -> Path:
        """Store one instance's bytes (a whole Part 10 file) atomically; an existing file is kept as it is."""
        target = self.path_for(study_uid, series_uid, sop_uid)
        if target.is_file():
            return target
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
        with self._lock:
            self.written += 1
            self.bytes += len(data)
        if self.on_write is not None:
            self.on_write(target)
        return target

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*" + SUFFIX) if not p.name.startswith("."))
