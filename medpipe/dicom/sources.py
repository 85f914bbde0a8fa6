"""Where ingest input comes from: a folder (recursive), a ``.zip``, a DICOMDIR, or NIfTI files.

Every input file gets a *key*, a string that names it unambiguously:

* a file: its absolute path (``/data/export/IM0001``), whatever characters its name holds
  (``a::b.dcm`` included); a path that is not valid UTF-8 (rare, legal on Linux) is written
  ``file:`` + its percent-encoded bytes, since the catalog and CSV files hold text;
* a zip member: ``zip:`` + the archive's absolute path with ``%`` and ``:`` percent-encoded +
  ``::`` + the member name (``zip:/data/export.zip::DICOM/IM0001``).

An absolute path never starts with ``zip:`` or ``file:``, and the encoded archive path holds no
``::``, so no real file name can be mistaken for a zip member. :func:`open_key` opens any key for
reading; nothing here ever writes to a source.

What cannot be read is listed with a reason (:attr:`SourceFile.reason`) rather than dropped:
symbolic links to folders (not followed, so a link loop cannot trap the walk and a link cannot lead
outside the source), dangling links and link loops, fifos and other special files, unreadable
folders, encrypted or unsafe zip members (a member that would expand beyond
:func:`medpipe.io.expansion_problem`'s limit) and DICOMDIR references that leave the DICOMDIR's folder.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote, unquote_to_bytes

from medpipe.errors import SourceError
from medpipe.io import expansion_problem

ZIP_PREFIX = "zip:"
ZIP_SEP = "::"
RAW_PREFIX = "file:"
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: zip members up to this size are read into memory in one go (and their CRC checked); larger ones are
#: streamed (after one pass that checks their CRC), so memory never holds a whole large member
IN_MEMORY_MEMBER_BYTES = 64 << 20


class UnreadableSource(OSError):
    """A source file or zip member that cannot be read; ``str(exc)`` is the one-line reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class SourceFile:
    key: str
    size: int
    mtime_ns: int
    reason: str | None = None  # why it cannot be read at all (found while listing), else None


# -- keys ------------------------------------------------------------------------------------------


def file_key(path: str) -> str:
    """The key of a file at ``path`` (absolute)."""
    path = os.path.abspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in the name (surrogate escapes)
        return RAW_PREFIX + quote(os.fsencode(path), safe="/")
    return path


def zip_key(archive: Path | str, member: str) -> str:
    """The key of ``member`` of the zip file ``archive``."""
    encoded = os.path.abspath(archive).replace("%", "%25").replace(":", "%3A")
    return f"{ZIP_PREFIX}{encoded}{ZIP_SEP}{member}"


def is_zip_key(key: str) -> bool:
    return key.startswith(ZIP_PREFIX)


def split_zip_key(key: str) -> tuple[str, str]:
    """``(archive path, member name)`` of a zip member key."""
    encoded, member = key[len(ZIP_PREFIX):].split(ZIP_SEP, 1)
    return unquote(encoded), member


def key_path(key: str) -> str | bytes | None:
    """The file system path of a file key (what ``open`` takes), None for a zip member."""
    if is_zip_key(key):
        return None
    if key.startswith(RAW_PREFIX):
        return unquote_to_bytes(key[len(RAW_PREFIX):])
    return key


def key_name(key: str) -> str:
    """The file name part of a key (the member's base name for a zip member)."""
    if is_zip_key(key):
        return split_zip_key(key)[1].rsplit("/", 1)[-1]
    path = key_path(key)
    return os.fsdecode(os.path.basename(path)) if path is not None else key


def key_in_folder(key: str, folder: Path | str) -> bool:
    """Whether a file key lies under ``folder`` (a zip member never does)."""
    path = key_path(key)
    if path is None:
        return False
    prefix = os.fsencode(os.path.abspath(folder)).rstrip(b"/") + b"/"
    return os.fsencode(path).startswith(prefix)


def is_nifti(key: str) -> bool:
    return not is_zip_key(key) and key.lower().endswith(NIFTI_SUFFIXES)


# -- listing ---------------------------------------------------------------------------------------


def _link_reason(path: str) -> str | None:
    """Why a symbolic link at ``path`` cannot be read as a file, or None when it leads to one."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: not followed"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"dangling symbolic link (its target {os.readlink(path)!r} does not exist)"
        return f"unreadable symbolic link: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "symbolic link to a folder: not followed (ingest the folder it points to directly)"
    if not stat.S_ISREG(st.st_mode):
        return "symbolic link to a special file (not a regular file): not read"
    return None


def _walk(root: Path) -> Iterator[SourceFile]:
    problems: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=problems.append, followlinks=False):
        while problems:  # folders os.walk could not list: explained, not silently skipped
            exc = problems.pop()
            where = exc.filename if isinstance(exc.filename, str) else dirpath
            yield SourceFile(file_key(where), 0, 0, f"unreadable folder: {exc.strerror or exc}")
        dirnames.sort()
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in links:  # os.walk lists links to folders as folders and does not enter them
            dirnames.remove(name)
            filenames.append(name)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                lst = os.lstat(path)
            except OSError as exc:
                yield SourceFile(file_key(path), 0, 0, f"unreadable file: {exc.strerror or exc}")
                continue
            if stat.S_ISLNK(lst.st_mode):
                reason = _link_reason(path)
                if reason is not None:
                    yield SourceFile(file_key(path), 0, lst.st_mtime_ns, reason)
                    continue
                st = os.stat(path)
            else:
                st = lst
            if not stat.S_ISREG(st.st_mode):
                yield SourceFile(file_key(path), 0, st.st_mtime_ns, "not a regular file (fifo, socket or device): not read")
                continue
            yield SourceFile(file_key(path), st.st_size, st.st_mtime_ns)
    while problems:
        exc = problems.pop()
        yield SourceFile(file_key(str(exc.filename or root)), 0, 0, f"unreadable folder: {exc.strerror or exc}")


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not read at all (encrypted, unknown compression, a decompression bomb), or None."""
    if info.flag_bits & 0x1:
        return "encrypted zip member: not read"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        return f"zip member compressed with method {info.compress_type}, which Python cannot read"
    return expansion_problem(info.file_size, info.compress_size, "zip member")


def _zip_members(path: Path) -> Iterator[SourceFile]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise SourceError(f"{path}: not a readable zip archive ({exc})") from exc
    mtime = path.stat().st_mtime_ns
    with zf:
        members = {i.filename: i for i in zf.infolist() if not i.is_dir()}  # a repeated name: the last
        for name in sorted(members):
            info = members[name]
            # zip members have no mtime of their own worth trusting: use the archive's plus the CRC
            yield SourceFile(zip_key(path.resolve(), name), info.file_size, mtime ^ info.CRC, member_problem(info))


def _reference_problem(parts: list[str]) -> str | None:
    """Why a DICOMDIR ReferencedFileID is refused (absolute, or climbing out of the DICOMDIR's folder)."""
    shown = "\\".join(parts)
    for part in parts:
        if part in ("", ".", "..") or part.startswith(("/", "\\")) or "/" in part or "\\" in part or \
                (len(part) >= 2 and part[1] == ":") or "\x00" in part:
            return f"DICOMDIR reference {shown!r} leaves the DICOMDIR's folder (absolute or '..'): refused"
    return None


def _dicomdir_files(path: Path) -> Iterator[SourceFile]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records = ds.DirectoryRecordSequence
    except Exception as exc:
        raise SourceError(f"{path}: not a readable DICOMDIR ({exc})") from exc
    base = path.resolve().parent
    real_base = os.path.realpath(base)
    seen = set()
    for n, rec in enumerate(records):
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(ref)] if isinstance(ref, str) else [str(p) for p in ref]
        problem = _reference_problem(parts)
        if problem:
            yield SourceFile(f"{base / path.name}#record{n + 1}", 0, 0, problem)
            continue
        target = base.joinpath(*parts)
        if not target.exists():
            # DICOMDIR file IDs are upper case on the medium; the copy may not be
            matches = [p for p in target.parent.glob("*") if p.name.upper() == target.name.upper()] if target.parent.exists() else []
            target = matches[0] if matches else target
        key = file_key(str(target))
        if key in seen:
            continue
        seen.add(key)
        real = os.path.realpath(target.parent)
        if real != real_base and not real.startswith(real_base + os.sep):
            yield SourceFile(key, 0, 0, f"DICOMDIR reference {chr(92).join(parts)!r} leads out of the DICOMDIR's "
                                        "folder through a symbolic link: refused")
            continue
        try:
            st = target.stat()
        except OSError:
            yield SourceFile(key, 0, 0, "listed in DICOMDIR but missing on disk")
            continue
        if not stat.S_ISREG(st.st_mode):
            yield SourceFile(key, 0, st.st_mtime_ns, "listed in DICOMDIR but not a regular file: not read")
            continue
        yield SourceFile(key, st.st_size, st.st_mtime_ns)


def list_source(src: Path | str) -> Iterator[SourceFile]:
    """All files of one ingest source, in a stable order (those that cannot be read with a reason).

    Raises:
        SourceError: ``src`` does not exist or is not a folder, zip, DICOMDIR or file.
    """
    src = Path(src).expanduser()
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    if src.is_dir():
        return _walk(src)
    if not src.is_file():
        raise SourceError(f"{src}: not a regular file or folder")
    if zipfile.is_zipfile(src):
        return _zip_members(src)
    if src.name.upper() == "DICOMDIR":
        return _dicomdir_files(src)
    st = src.stat()
    return iter([SourceFile(file_key(str(src.resolve())), st.st_size, st.st_mtime_ns)])


# -- reading ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _zip(path: str, pid: int) -> zipfile.ZipFile:
    # keyed by process: a worker forked from a process that has the archive open must not share
    # its file offset (the two would move each other's reads)
    return zipfile.ZipFile(path)


#: what Python's zipfile and its decompressors raise on a corrupt member
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError, OSError)


def _zip_error(member: str, exc: BaseException) -> UnreadableSource:
    import zlib

    if isinstance(exc, zlib.error):
        return UnreadableSource(f"corrupt zip member {member!r} (deflate stream: {exc})")
    return UnreadableSource(f"corrupt zip member {member!r} ({type(exc).__name__}: {exc})")


def _open_member(key: str) -> IO[bytes]:
    import zlib

    archive, member = split_zip_key(key)
    try:
        zf = _zip(archive, os.getpid())
        info = zf.getinfo(member)
    except KeyError:
        raise UnreadableSource(f"zip member {member!r} is not in {archive}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnreadableSource(f"unreadable zip archive {archive}: {exc}") from exc
    problem = member_problem(info)
    if problem:
        raise UnreadableSource(problem)
    try:
        if info.file_size <= IN_MEMORY_MEMBER_BYTES:
            return io.BytesIO(zf.read(info))  # checks the CRC
        with zf.open(info) as fh:  # a large member: check it whole once, then stream it
            while fh.read(1 << 20):
                pass
        return zf.open(info)
    except (zlib.error, *_ZIP_ERRORS) as exc:
        raise _zip_error(member, exc) from exc


def open_key(key: str) -> IO[bytes]:
    """Open a source key (file or zip member) for binary reading.

    Raises:
        OSError: it cannot be read (:class:`UnreadableSource` for a corrupt or refused zip member).
    """
    path = key_path(key)
    if path is None:
        return _open_member(key)
    return open(path, "rb")


def display_path(key: str, root: Path | None = None) -> str:
    """The key as users should see it (relative to ``root`` where possible)."""
    if root is not None and not is_zip_key(key) and not key.startswith(RAW_PREFIX):
        try:
            return str(Path(key).relative_to(root))
        except ValueError:
            pass
    return key
