"""Atomic file output: write to a temporary name beside the target, then ``os.replace``.

A killed process therefore never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: permissions of new files (mkstemp makes them 0600; outputs should look like any other file)
_FILE_MODE = 0o666 & ~_current_umask()

#: temporary files are named ``.<target name>.<random>.tmp<suffixes>``
TMP_MARKER = ".tmp"


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files a killed run left under ``folder``; return how many."""
    n = 0
    for p in folder.rglob(".*"):
        if p.is_file() and TMP_MARKER in p.name and p.name.count(".") >= 3:
            p.unlink(missing_ok=True)
            n += 1
    return n


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; move it onto ``target`` on success.

    The temporary name keeps ``target``'s suffixes (so ``.nii.gz`` writers still compress).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f"{TMP_MARKER}{suffix}", dir=target.parent)
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
