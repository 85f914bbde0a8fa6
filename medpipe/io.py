"""Atomic file output: write to a temporary name beside the target, then ``os.replace``.

A killed process therefore never leaves a half-written file under the final name. Temporary files
start with :data:`TMP_PREFIX`, so a later run can clean up after a killed one without ever touching
a file it did not write. Also here: the exclusive lock of an output folder (:func:`folder_lock`) and
the one rule on how far compressed input may expand (:func:`expansion_problem`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: permissions of new files (mkstemp makes them 0600; outputs should look like any other file)
_FILE_MODE = 0o666 & ~_current_umask()

#: temporary files are named ``.medpipe-tmp.<random>.tmp.<target name>``: the prefix says whose they
#: are (only such files are ever deleted as stale), the target's suffixes stay last (``.nii.gz`` writers
#: still compress) and ``.tmp`` marks them for people
TMP_PREFIX = ".medpipe-tmp."
TMP_MARKER = ".tmp"  # part of every temporary name (see TMP_PREFIX); no longer enough to delete a file


def is_temporary(name: str) -> bool:
    """Whether a file name is one of medpipe's own temporary files (:func:`atomic_path`)."""
    return name.startswith(TMP_PREFIX)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete medpipe's own temporary files a killed run left under ``folder``; return how many.

    Only regular files named by :func:`atomic_path` (``.medpipe-tmp.*``) are deleted, never a user's
    file, and symbolic links (to folders or files) are not followed.
    """
    n = 0
    for dirpath, _, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            if not is_temporary(name):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                n += 1
    return n


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; move it onto ``target`` on success.

    The temporary name keeps ``target``'s suffixes (so ``.nii.gz`` writers still compress).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=f"{TMP_MARKER}.{target.name}", dir=target.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(target: Path | str, mode: str = "w", **kwargs: object) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``target`` when the block succeeds."""
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:  # type: ignore[call-overload]
        yield fh


def write_text_atomic(target: Path | str, text: str) -> None:
    with atomic_open(target, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def gzip_file(src: Path | str, dst: Path | str, level: int = 1, threads: int | None = None,
              chunk: int = 4 << 20) -> None:
    """Gzip ``src`` into ``dst`` as one gzip member, compressing chunks on several threads.

    Like pigz: each chunk is raw-deflated independently and ended with a sync flush, so the
    concatenation is a single valid deflate stream that every gzip reader accepts. zlib releases
    the GIL, so the threads really run in parallel. The header's mtime is 0: output is reproducible.
    """
    import mmap
    import struct
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or min(os.cpu_count() or 1, 8)
    with open(src, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            view = memoryview(mm)
            bounds = [(a, min(a + chunk, size)) for a in range(0, size, chunk)] or [(0, 0)]
            last = len(bounds) - 1

            def deflate(i: int) -> bytes:
                comp = zlib.compressobj(level, zlib.DEFLATED, -15)
                a, b = bounds[i]
                return comp.compress(view[a:b]) + comp.flush(zlib.Z_FINISH if i == last else zlib.Z_SYNC_FLUSH)

            with ThreadPoolExecutor(threads) as pool:
                crc_future = pool.submit(zlib.crc32, view)
                parts = list(pool.map(deflate, range(len(bounds))))
                crc = crc_future.result()
            with open(dst, "wb") as out:
                out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # magic, deflate, no flags, mtime 0
                for p in parts:
                    out.write(p)
                out.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
            view.release()
        finally:
            if size:
                mm.close()  # type: ignore[union-attr]


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def csv_text(rows: Iterable[Mapping[str, object]], fieldnames: list[str], *, ignore_extra: bool = False) -> str:
    """``rows`` as CSV text with a header line and ``\n`` line ends (the one CSV format medpipe writes).

    ``ignore_extra``: leave out keys of a row that are not in ``fieldnames`` (else they are an error).
    """
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n",
                            extrasaction="ignore" if ignore_extra else "raise")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv_atomic(path: Path | str, rows: Iterable[Mapping[str, object]], fieldnames: list[str], *,
                     ignore_extra: bool = False) -> None:
    """``rows`` as a CSV file (:func:`csv_text`), written atomically."""
    write_text_atomic(path, csv_text(rows, fieldnames, ignore_extra=ignore_extra))


# -- compressed input ------------------------------------------------------------------------------

#: compressed input (a zip member, a deflated DICOM dataset, a MedMNIST array) may expand to this many
#: bytes whatever its compression ratio ...
EXPANSION_FREE_BYTES = 64 << 20
#: ... and beyond that to at most this many times its compressed size (real images rarely compress
#: better than 20:1; the deflate "bombs" of the issue expand about 1000:1)
MAX_EXPANSION_RATIO = 100


def expansion_problem(expanded: int, compressed: int, what: str = "compressed data", *,
                      at_least: bool = False) -> str | None:
    """Why ``compressed`` bytes that expand to ``expanded`` bytes (``at_least``: to more than that; the
    caller stopped counting) are refused, or None when they are fine."""
    if expanded <= EXPANSION_FREE_BYTES or expanded <= MAX_EXPANSION_RATIO * max(compressed, 1):
        return None
    ratio = expanded / max(compressed, 1)
    more = "more than " if at_least else ""
    return (f"{what} would expand {more}{ratio:.0f}:1 ({_mb(compressed)} to {more}{_mb(expanded)}), more than the "
            f"{MAX_EXPANSION_RATIO}:1 medpipe accepts above {_mb(EXPANSION_FREE_BYTES)}: refused as a possible "
            "decompression bomb")


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


# -- the output folder lock ------------------------------------------------------------------------

#: the lock file medpipe keeps in an output folder it writes (empty; it stays there)
LOCK_FILE = ".medpipe.lock"


class FolderLocked(Exception):
    """Another process holds the lock of the folder (``str(exc)`` names it)."""


_held: set[str] = set()  # folders this process holds (POSIX record locks do not exclude the same process)
_held_lock = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: Path | str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (``folder/.medpipe.lock``) for the block; yield the lock file.

    A POSIX record lock (``lockf``): it belongs to this process alone, so it is released when the
    block ends or the process dies (even by ``kill -9``), and worker processes that outlive their
    parent never keep a folder locked. Within this process a second holder is refused as well.

    Raises:
        FolderLocked: another process (or another thread here) holds it.
        OSError: the lock file cannot be created (a read-only folder, ...).
    """
    path = Path(folder) / LOCK_FILE
    name = os.path.abspath(path)
    with _held_lock:
        if name in _held:
            raise FolderLocked(f"{folder} is in use (lock {path} held by this process)")
        _held.add(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
        try:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX: no lock between processes
                fcntl = None  # type: ignore[assignment]
            if fcntl is not None:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    raise FolderLocked(f"{folder} is in use by another medpipe process (lock {path})") from None
            yield path
        finally:
            os.close(fd)  # releases the lock
    finally:
        with _held_lock:
            _held.discard(name)
