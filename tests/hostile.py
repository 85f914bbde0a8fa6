"""Helpers for the hostile-input ingest tests: crafted DICOM files, peak memory of a command, small file systems.

Every hostile input is built here from a good synthetic slice (:mod:`tests.dicom_factory`), byte by
byte where pydicom would refuse to write it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom import config
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]


# -- crafted DICOM ------------------------------------------------------------------------------


def variant(src: Path, dst: Path, name: str, **attrs: Any) -> Path:
    """A copy of the DICOM file ``src`` with new UIDs (its own series ``name``) and ``attrs`` set as given.

    Values are set without pydicom's validation, so illegal ones (NaN, 1e300, Rows 0) are written.
    """
    from tests.dicom_factory import uid

    ds = pydicom.dcmread(src)
    sop = uid("hostile", name, dst.name)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SeriesInstanceUID = uid("hostile series", name)
    ds.SeriesDescription = f"hostile {name}"
    ds.SeriesNumber = 90
    with config.disable_value_validation():
        for key, value in attrs.items():
            setattr(ds, key, value)
        dst.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dst, enforce_file_format=True)
    return dst


def pixel_element_offset(data: bytes) -> tuple[int, int]:
    """(offset of the (7FE0,0010) tag, length of its element header) in an explicit VR file."""
    pos = data.rfind(b"\xe0\x7f\x10\x00")
    if pos < 0:
        raise ValueError("no pixel data")
    return pos, 12 if data[pos + 4 : pos + 6] in (b"OW", b"OB") else 8


def short_pixel_data_then_element(src: Path, dst: Path, name: str) -> Path:
    """A copy of ``src`` whose Pixel Data element holds half of Rows x Columns x 2 bytes and is followed
    by another element (Data Set Trailing Padding), so the file is long enough to read past its end."""
    variant(src, dst, name)
    data = dst.read_bytes()
    pos, head = pixel_element_offset(data)
    (length,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    half = length // 2
    pixels = data[pos + head : pos + head + half]
    filler = (bytes(range(256)) * (length // 256 + 1))[:length]
    padding = b"\xfc\xff\xfc\xff" + b"OB\x00\x00" + struct.pack("<I", length) + filler
    dst.write_bytes(data[:pos] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", half) + pixels + padding)
    return dst


def deflated_bomb(dst: Path, template: Path, expanded_mb: int) -> Path:
    """A Deflated Explicit VR Little Endian file of about ``expanded_mb / 1000`` MB whose dataset inflates to
    ``expanded_mb`` MB (an image of that many MB of zeros), written without ever holding it in memory."""
    ds = pydicom.dcmread(template, stop_before_pixels=True)
    n = expanded_mb << 20
    ds.Rows, ds.Columns = n // 65536, 32768  # 2 bytes per pixel: n bytes
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    del ds.file_meta
    write_dataset(body, ds)
    body.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n))
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(body.getvalue()) + comp.flush(zlib.Z_FULL_FLUSH)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = comp.compress(b"\x00" * (1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)  # independent: repeatable
    with open(dst, "wb") as fh:
        fh.write(meta.getvalue() + head)
        fh.writelines(zeros for _ in range(expanded_mb))
        fh.write(zlib.compressobj(9, zlib.DEFLATED, -15).flush())  # an empty final block
    return dst


def zip_with(dst: Path, files: dict[str, Path | bytes], *, bomb_mb: int = 0, bomb_name: str = "bomb.dcm") -> Path:
    """A zip of ``files`` (member name -> file or bytes, deflated) plus, with ``bomb_mb``, a member of that
    many MB of zeros (deflated ~200:1 at level 1, streamed so the test never holds it)."""
    import zipfile

    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, content in files.items():
            if isinstance(content, Path):
                zf.write(content, name)
            else:
                zf.writestr(name, content)
        if bomb_mb:
            with zf.open(bomb_name, "w", force_zip64=True) as fh:
                block = b"\x00" * (1 << 20)
                for _ in range(bomb_mb):
                    fh.write(block)
    return dst


def corrupt_member(zip_path: Path, member: str) -> None:
    """Flip bytes in the middle of ``member``'s compressed data (its CRC no longer matches)."""
    import zipfile

    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    with open(zip_path, "r+b") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start + info.compress_size // 2)
        chunk = fh.read(16)
        fh.seek(start + info.compress_size // 2)
        fh.write(bytes(b ^ 0x5A for b in chunk))


# -- peak memory of a command -------------------------------------------------------------------

_WRAPPER = r"""
import os, resource, subprocess, sys
limit = int(sys.argv[1])
def cap():
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
proc = subprocess.Popen(sys.argv[2:], preexec_fn=cap)
_, status, usage = os.wait4(proc.pid, 0)
print(f"\nPEAK_RSS_KB {usage.ru_maxrss} RC {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def peak_rss(cmd: Sequence[str], *, address_space_mb: int = 4096, timeout: float = 300) -> tuple[int, float, str]:
    """Run ``cmd``; return (exit code, its peak resident memory in MB, stdout + stderr).

    The command runs as the child of a small Python wrapper that reports ``wait4``'s ``ru_maxrss``:
    measuring it from this (large) test process would count the test process itself, which Linux
    folds into a child's peak until it calls exec. ``address_space_mb`` caps the command's address
    space, so a regression fails with a MemoryError instead of exhausting a shared machine.
    """
    # one BLAS / OpenMP thread and two malloc arenas: on a many-core machine their reserved (never touched)
    # address space would otherwise hit the cap before any file is read
    env = {**_env(), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}
    res = subprocess.run([sys.executable, "-c", _WRAPPER, str(address_space_mb << 20), *cmd], capture_output=True,
                         text=True, timeout=timeout, cwd=REPO, env=env, check=False)
    out = res.stdout + res.stderr
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")][-1].split()
    return int(line[3]), int(line[1]) / 1024, out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def ingest_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medpipe.cli", "ingest", str(src), "--out", str(out), "--quiet", *extra]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env(), check=False)


# -- small and read-only file systems ------------------------------------------------------------

_MOUNT = r"""
mp="$1"; size="$2"; ro="$3"; shift 3
mount -t tmpfs -o "size=$size" medpipe-test "$mp" || exit 97
if [ "$ro" = ro ]; then mount -o remount,ro "$mp" || exit 97; fi
"$@"
rc=$?
echo "LEFT_IN_OUT:"; ls -A1R "$mp"
exit $rc
"""


def run_on_tmpfs(mountpoint: Path, size: str, cmd: Sequence[str], *, read_only: bool = False,
                 timeout: float = 300) -> tuple[subprocess.CompletedProcess[str] | None, str]:
    """Run ``cmd`` with a fresh tmpfs of ``size`` (e.g. ``"256k"``) mounted on ``mountpoint``.

    The file system is real (writes fail with ENOSPC / EROFS as on a full or read-only disk); it is
    mounted in a private mount namespace (``unshare``; as root, or as any user where unprivileged user
    namespaces are allowed), so nothing outside the command sees it. Returns (None, why) when this
    machine allows neither.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "no unshare command"
    prefix = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
    res = subprocess.run([*prefix, "sh", "-c", _MOUNT, "sh", str(mountpoint), size, "ro" if read_only else "rw",
                          *cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env(), check=False)
    if res.returncode == 97 or "unshare failed" in res.stderr or "Operation not permitted" in res.stderr:
        if os.geteuid() == 0 and res.returncode != 97:
            warnings.warn(f"unshare refused: {res.stderr.strip()}", stacklevel=2)
        return None, res.stderr.strip() or "mount refused"
    return res, ""
