"""Where ingest input comes from: a folder (recursive), a ``.zip``, a DICOMDIR, or NIfTI files.

Every input file gets a *key*: its absolute path, or ``/abs/archive.zip::member/name`` for a zip
member. :func:`open_key` opens any key for reading; nothing here ever writes to a source.
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medpipe.errors import SourceError

ZIP_SEP = "::"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SourceFile:
    key: str
    size: int
    mtime_ns: int


def is_nifti(key: str) -> bool:
    return key.lower().endswith(NIFTI_SUFFIXES)


def _walk(root: Path) -> Iterator[SourceFile]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if os.path.isfile(path):
                yield SourceFile(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _zip_members(path: Path) -> Iterator[SourceFile]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{path}: not a readable zip archive ({exc})") from exc
    mtime = path.stat().st_mtime_ns
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            # zip members have no mtime of their own worth trusting: use the archive's plus the CRC
            yield SourceFile(f"{path.resolve()}{ZIP_SEP}{info.filename}", info.file_size, mtime ^ info.CRC)


def _dicomdir_files(path: Path) -> Iterator[SourceFile]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records = ds.DirectoryRecordSequence
    except Exception as exc:
        raise SourceError(f"{path}: not a readable DICOMDIR ({exc})") from exc
    base = path.resolve().parent
    seen = set()
    for rec in records:
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        target = base.joinpath(*parts)
        if not target.exists():
            # DICOMDIR file IDs are upper case on the medium; the copy may not be
            matches = [p for p in target.parent.glob("*") if p.name.upper() == target.name.upper()] if target.parent.exists() else []
            target = matches[0] if matches else target
        key = str(target)
        if key in seen:
            continue
        seen.add(key)
        try:
            st = target.stat()
        except OSError:
            yield SourceFile(key, -1, 0)  # listed but missing: rejected by the scanner
            continue
        yield SourceFile(key, st.st_size, st.st_mtime_ns)


def list_source(src: Path | str) -> Iterator[SourceFile]:
    """All files of one ingest source, in a stable order.

    Raises:
        SourceError: ``src`` does not exist or is not a folder, zip, DICOMDIR or file.
    """
    src = Path(src).expanduser()
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    if src.is_dir():
        return _walk(src)
    if zipfile.is_zipfile(src):
        return _zip_members(src)
    if src.name.upper() == "DICOMDIR":
        return _dicomdir_files(src)
    st = src.stat()
    return iter([SourceFile(str(src.resolve()), st.st_size, st.st_mtime_ns)])


@functools.lru_cache(maxsize=4)
def _zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def open_key(key: str) -> IO[bytes]:
    """Open a source key (file path or zip member) for binary reading."""
    if ZIP_SEP in key:
        archive, member = key.split(ZIP_SEP, 1)
        return io.BytesIO(_zip(archive).read(member))
    return open(key, "rb")


def display_path(key: str, root: Path | None = None) -> str:
    """The key as users should see it (relative to ``root`` where possible)."""
    if root is not None:
        try:
            return str(Path(key).relative_to(root))
        except ValueError:
            pass
    return key
