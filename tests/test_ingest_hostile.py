"""``medpipe ingest`` against hostile input and a hostile environment: one class of attack per test.

Each test builds its hostile input itself (tiny files, :mod:`tests.hostile`), puts it next to a good
series, and checks both halves of the promise: the bad input is rejected with its reason (or the run
stops with a one-line error, exit 2, when the output folder itself is the problem), and the good series
of the same run is ingested (volume, ``manifest.csv`` and ``rejected.csv`` written).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medpipe.ingest import IngestReport, ingest
from medpipe.io import TMP_PREFIX
from tests.dicom_factory import (
    Geometry,
    JPEGLSLossless,
    Written,
    assert_world_equal,
    pattern,
    sha256_tree,
    write_series,
)
from tests.hostile import (
    REPO,
    corrupt_member,
    deflated_bomb,
    ingest_cmd,
    peak_rss,
    run_cli,
    run_on_tmpfs,
    short_pixel_data_then_element,
    variant,
    zip_with,
)

SHAPE = (16, 12, 8)


# -- helpers -------------------------------------------------------------------------------------


def good_series(folder: Path, **kw: Any) -> Written:
    return write_series(folder, pattern(SHAPE), Geometry(), tag="good", series_description="good", **kw)


def rejected_csv(out: Path) -> dict[str, str]:
    with open(out / "rejected.csv", newline="", encoding="utf-8") as fh:
        return {r["path"]: r["reason"] for r in csv.DictReader(fh)}


def manifest_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_good_ingested(out: Path, good: Written, report: IngestReport | None = None) -> dict[str, str]:
    """The good series is one ``ok`` volume with the right voxels; manifest.csv and rejected.csv exist."""
    assert (out / "rejected.csv").is_file() and (out / "manifest.csv").is_file()
    rows = [r for r in manifest_csv(out) if r["series_uid"] == good.series_uid]
    assert len(rows) == 1, manifest_csv(out)
    row = rows[0]
    assert row["status"] == "ok", row["reasons"]
    assert int(row["n_files"]) == len(good.files)
    assert_world_equal(out / row["volume"], good.truth, good.affine)
    assert (out / row["sidecar"]).is_file() and (out / row["preview"]).is_file()
    if report is not None:
        assert any(v["series_uid"] == good.series_uid and v["status"] == "ok" for v in report.volumes)
    return row


def rejected_for(out: Path, path: Path | str) -> str:
    reasons = rejected_csv(out)
    key = os.path.abspath(path) if isinstance(path, Path) else path
    assert key in reasons, f"{key} not in rejected.csv: {sorted(reasons)}"
    return reasons[key]


def one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, an ``error:`` line (maybe a hint) on stderr, never a traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), res.stderr
    assert len(lines) == 1 or lines[1].startswith("hint: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- one bad file never stops the run ------------------------------------------------------------


@pytest.mark.parametrize("case", ["rows_columns", "frames", "encapsulated_frames", "encapsulated_ratio", "gigantic"])
def test_header_bomb_is_rejected(tmp_path: Path, case: str) -> None:
    """Class: header bombs (Rows x Columns x Frames far larger than the pixel data)."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    bomb = src / "bomb.dcm"
    if case == "rows_columns":  # 4096 x 4096 declared, 384 bytes there: rejected, never allocated
        variant(good.files[0], bomb, case, Rows=4096, Columns=4096)
        expect = "pixel data element holds 384 bytes but Rows x Columns x Frames needs 33554432"
    elif case == "frames":
        variant(good.files[0], bomb, case, NumberOfFrames=50_000)
        expect = "pixel data element holds 384 bytes but Rows x Columns x Frames needs 19200000"
    elif case == "gigantic":  # more than one file may hold
        variant(good.files[0], bomb, case, Rows=65535, Columns=65535, NumberOfFrames=1000)
        expect = "GB of pixels), more than the"
    else:  # a compressed frame of a few hundred bytes claiming 40 frames, or 8192 x 8192 pixels (128 MB)
        jls = write_series(tmp_path / "jls", pattern(SHAPE, seed=3), Geometry(), transfer_syntax=JPEGLSLossless,
                           tag="jls")
        if case == "encapsulated_frames":
            variant(jls.files[0], bomb, case, NumberOfFrames=40)
            expect = "fragment(s) for 40 frame(s)"
        else:
            variant(jls.files[0], bomb, case, Rows=8192, Columns=8192)
            expect = "header declares 134217728 bytes of pixels from"
    report = ingest(src, out, workers=1)
    assert expect in rejected_for(out, bomb)
    assert_good_ingested(out, good, report)


@pytest.mark.parametrize("rows, columns", [(0, 16), (12, 0), (0, 0)])
def test_rows_or_columns_zero_rejected(tmp_path: Path, rows: int, columns: int) -> None:
    """Class: Rows 0 (or Columns 0): an image without pixels."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    bad = variant(good.files[0], src / "rows0.dcm", "rows0", Rows=rows, Columns=columns)
    report = ingest(src, out, workers=1)
    assert "no pixels" in rejected_for(out, bad)
    assert_good_ingested(out, good, report)


@pytest.mark.parametrize("bits", [0, 1, 12, 64])
def test_bits_allocated_unsupported_rejected(tmp_path: Path, bits: int) -> None:
    """Class: BitsAllocated 0 or 1 (and other widths that are not 8, 16 or 32)."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    bad = variant(good.files[0], src / f"bits{bits}.dcm", f"bits{bits}", BitsAllocated=bits,
                  BitsStored=max(bits, 1), HighBit=max(bits - 1, 0))
    report = ingest(src, out, workers=1)
    assert f"BitsAllocated {bits} is not supported" in rejected_for(out, bad)
    assert_good_ingested(out, good, report)


@pytest.mark.parametrize("attr, value", [("RescaleSlope", "NaN"), ("RescaleSlope", "inf"), ("RescaleSlope", "-inf"),
                                         ("RescaleIntercept", "NaN"), ("RescaleSlope", "1e300")])
def test_rescale_not_finite_rejected(tmp_path: Path, attr: str, value: str) -> None:
    """Class: RescaleSlope / RescaleIntercept NaN, inf or absurd."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    # a whole hostile series, so that its rejection cannot hide behind a single-file reason
    bad = [variant(p, src / "bad" / p.name, "rescale", **{attr: value}) for p in good.files[:4]]
    report = ingest(src, out, workers=1)
    for p in bad:
        reason = rejected_for(out, p)
        assert attr in reason and "not a usable number" in reason, reason
    assert_good_ingested(out, good, report)


@pytest.mark.parametrize("attr, value", [
    ("PixelSpacing", ["1e300", "1e300"]), ("PixelSpacing", ["1e-300", "0.8"]),
    ("ImagePositionPatient", ["1e300", "0", "0"]), ("ImagePositionPatient", ["0", "-1e300", "5"]),
])
def test_absurd_spacing_or_position_rejected(tmp_path: Path, attr: str, value: list[str]) -> None:
    """Class: PixelSpacing or ImagePositionPatient of 1e300 (numbers no scanner writes, that overflow geometry)."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    bad = [variant(p, src / "bad" / p.name, "geometry", **{attr: value}) for p in good.files[:4]]
    report = ingest(src, out, workers=1)
    for p in bad:
        assert f"{attr} " in rejected_for(out, p) and "out of range" in rejected_for(out, p)
    assert_good_ingested(out, good, report)


def test_corrupt_zip_member_rejected(tmp_path: Path) -> None:
    """Class: a corrupt zip member (deflate stream or CRC broken); the other members are ingested."""
    good = good_series(tmp_path / "series")
    other = write_series(tmp_path / "other", pattern(SHAPE, seed=5), Geometry(), tag="other")
    members = {f"good/{p.name}": p for p in good.files}
    members.update({f"other/{p.name}": p for p in other.files[:2]})
    archive = zip_with(tmp_path / "export.zip", members)
    corrupt_member(archive, f"other/{other.files[0].name}")
    corrupt_member(archive, f"other/{other.files[1].name}")
    out = tmp_path / "out"
    report = ingest(archive, out, workers=2)
    from medpipe.dicom.sources import zip_key

    for p in other.files[:2]:
        reason = rejected_for(out, zip_key(archive, f"other/{p.name}"))
        assert "corrupt zip member" in reason, reason
    assert_good_ingested(out, good, report)


def test_pixel_data_shorter_than_declared_is_rejected_not_read_past(tmp_path: Path) -> None:
    """Class: silent corruption: pixel data shorter than Rows x Columns x 2, followed by another element."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    # a whole series of such files: read past their end, it used to become an 'ok' volume of wrong values
    short = write_series(tmp_path / "short_src", pattern(SHAPE, seed=9), Geometry(origin=(0.0, 0.0, 300.0)),
                         tag="short")
    bad = [short_pixel_data_then_element(p, src / "short" / p.name, "short") for p in short.files]
    assert all(p.stat().st_size > q.stat().st_size for p, q in zip(bad, short.files))  # long enough to read on
    report = ingest(src, out, workers=1)
    for p in bad:
        assert "pixel data element holds" in rejected_for(out, p)
    assert not [v for v in report.volumes if v["series_description"] == "hostile short"]
    assert_good_ingested(out, good, report)


# -- memory caps -----------------------------------------------------------------------------------

BOMB_MB = 256  # what each bomb expands to; an unbounded reader holds at least this much
MEMORY_SLACK_MB = 64  # what a bomb may add to the peak of the same run without it


def test_zip_bomb_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Class: memory: a zip bomb (a member deflated ~200:1, 256 MB from 1 MB) is refused before it is read."""
    good = good_series(tmp_path / "series")
    members = {f"good/{p.name}": p for p in good.files}
    clean = zip_with(tmp_path / "clean.zip", members)
    bomb = zip_with(tmp_path / "bomb.zip", members, bomb_mb=BOMB_MB)
    assert bomb.stat().st_size < 2 << 20
    rc0, base_mb, log0 = peak_rss(ingest_cmd(clean, tmp_path / "out_clean", "--workers", "1"))
    rc, bomb_mb, log = peak_rss(ingest_cmd(bomb, tmp_path / "out", "--workers", "1"))
    assert rc0 == 0 and rc == 0, log0 + log
    assert bomb_mb < base_mb + MEMORY_SLACK_MB, f"peak {bomb_mb:.0f} MB with the bomb, {base_mb:.0f} MB without"
    from medpipe.dicom.sources import zip_key

    reason = rejected_for(tmp_path / "out", zip_key(bomb, "bomb.dcm"))
    assert "decompression bomb" in reason and "zip member" in reason, reason
    assert_good_ingested(tmp_path / "out", good)


def test_deflated_dicom_bomb_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Class: memory: a 0.3 MB deflated DICOM whose dataset inflates to 256 MB is refused in bounded memory."""
    src = tmp_path / "src"
    good = good_series(src / "good")
    clean_src = tmp_path / "clean"
    good_series(clean_src / "good")
    bomb = deflated_bomb(src / "deflated_bomb.dcm", good.files[0], BOMB_MB)
    assert bomb.stat().st_size < 1 << 20
    rc0, base_mb, log0 = peak_rss(ingest_cmd(clean_src, tmp_path / "out_clean", "--workers", "1"))
    rc, bomb_mb, log = peak_rss(ingest_cmd(src, tmp_path / "out", "--workers", "1"))
    assert rc0 == 0 and rc == 0, log0 + log
    assert bomb_mb < base_mb + MEMORY_SLACK_MB, f"peak {bomb_mb:.0f} MB with the bomb, {base_mb:.0f} MB without"
    reason = rejected_for(tmp_path / "out", bomb)
    assert "deflated DICOM dataset would expand" in reason and "decompression bomb" in reason, reason
    assert_good_ingested(tmp_path / "out", good)


def _npz_member(name: str, shape: tuple[int, ...], dtype: str, payload: bytes) -> tuple[str, bytes]:
    """An .npy member whose header declares ``shape`` but which holds ``payload``."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((0,), dtype=dtype))
    header["shape"] = shape
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return f"{name}.npy", buf.getvalue() + payload


def _medmnist_npz(path: Path, replace: dict[str, tuple[str, bytes]] | None = None, **arrays: np.ndarray) -> Path:
    """A small valid MedMNIST-like npz (4/2/2 images of 8x8), with some members replaced by crafted ones."""
    import io

    rng = np.random.default_rng(0)
    data: dict[str, np.ndarray] = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        data[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        data[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    data.update(arrays)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in data.items():
            if replace and name in replace:
                member, content = replace[name]
                zf.writestr(member, content)
                continue
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            zf.writestr(f"{name}.npy", buf.getvalue())
    return path


@pytest.mark.parametrize("case", ["values_1e13", "labels_1e9_entries", "label_value_1e9", "bomb_member"])
def test_npz_declared_sizes_capped(tmp_path: Path, case: str) -> None:
    """Class: memory: an .npz whose header declares 10^13 values, 10^9 labels, a label of 10^9, or a deflate bomb."""
    if case == "values_1e13":  # the header says 10^13 pixels, the member holds 64 bytes
        npz = _medmnist_npz(tmp_path / "x.npz", {"train_images": _npz_member("train_images", (10**13, 1, 1), "u1",
                                                                           bytes(64))})
        expect = "declares shape (10000000000000, 1, 1)"
    elif case == "labels_1e9_entries":
        npz = _medmnist_npz(tmp_path / "x.npz", {"train_labels": _npz_member("train_labels", (10**9, 1), "u1",
                                                                           bytes(4))})
        expect = "declares shape (1000000000, 1)"
    elif case == "label_value_1e9":  # one class index of 10^9: a billion class names, a billion-bin count
        npz = _medmnist_npz(tmp_path / "x.npz", train_labels=np.array([[0], [1], [10**9], [1]], dtype=np.int64))
        expect = "holds class 1000000000"
    else:  # a truthful header over 200 MB of zeros deflated to 0.2 MB
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (BOMB_MB << 20, 1, 1)})
        npz = tmp_path / "x.npz"
        _medmnist_npz(npz, {"train_images": ("skip", b"")})
        with zipfile.ZipFile(npz, "a", compression=zipfile.ZIP_DEFLATED) as zf:
            info = zipfile.ZipInfo("train_images.npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                fh.write(buf.getvalue())
                for _ in range(BOMB_MB):
                    fh.write(bytes(1 << 20))
        expect = "decompression bomb"
    rc, mb, log = peak_rss([sys.executable, "-m", "medpipe.cli", "import", "medmnist", str(npz), "--out",
                            str(tmp_path / "out")], address_space_mb=3072)
    assert rc == 2, log
    assert "Traceback" not in log and "MemoryError" not in log, log
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], log
    assert mb < 200, f"peak {mb:.0f} MB"
    # and a good file next to it imports
    ok = _medmnist_npz(tmp_path / "good.npz")
    res = run_cli("import", "medmnist", str(ok), "--out", str(tmp_path / "good_out"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "good_out" / "datalist.json").is_file()


# -- links, names, DICOMDIR ------------------------------------------------------------------------


def test_symlink_loops_dangling_links_and_linked_folders_explained(tmp_path: Path) -> None:
    """Class: symlink loops, dangling links and symlinked folders: each a line in rejected.csv, never followed."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src / "good")
    elsewhere = write_series(tmp_path / "elsewhere", pattern(SHAPE, seed=2), Geometry(), tag="elsewhere")
    (src / "loop").symlink_to("loop")
    (src / "ping").symlink_to("pong")
    (src / "pong").symlink_to("ping")
    (src / "dangling.dcm").symlink_to(tmp_path / "no_such_file.dcm")
    (src / "linked_folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (src / "good" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    os.mkfifo(src / "fifo")  # reading it would block forever
    report = ingest(src, out, workers=2)
    assert "symbolic link loop" in rejected_for(out, src / "loop")
    assert "symbolic link loop" in rejected_for(out, src / "ping")
    assert "symbolic link loop" in rejected_for(out, src / "pong")
    assert "dangling symbolic link" in rejected_for(out, src / "dangling.dcm")
    assert "symbolic link to a folder" in rejected_for(out, src / "linked_folder")
    assert "symbolic link to a folder" in rejected_for(out, src / "good" / "up")
    assert "not a regular file" in rejected_for(out, src / "fifo")
    assert not [v for v in report.volumes if v["series_uid"] == elsewhere.series_uid]
    assert_good_ingested(out, good, report)


def test_unusual_legal_file_names_are_read(tmp_path: Path) -> None:
    """Class: unusual but legal file names (``a::b.dcm``, ``zip:...``, a newline, non-UTF-8 bytes), in folders and zips."""
    src, out = tmp_path / "src", tmp_path / "out"
    names = ["a::b.dcm", "zip:c.dcm", "new\nline.dcm", "sp ace é.dcm", "file:%41.dcm", "x::", "::", "latin1"]
    good = write_series(src, pattern(SHAPE), Geometry(), tag="good", naming=lambda k, t: names[k])
    # a name that is not valid UTF-8 (legal on Linux): rename the last file to raw bytes
    raw = os.fsencode(str(src)) + b"/caf\xe9.dcm"
    os.rename(os.fsencode(str(good.paths[(7, 0)])), raw)
    report = ingest(src, out, workers=2)
    assert report.rejected == []
    v = report.volumes[0]
    assert len(report.volumes) == 1 and v["status"] == "ok" and v["n_files"] == 8, report.volumes
    assert_world_equal(out / v["volume"], good.truth, good.affine)
    assert (out / "rejected.csv").is_file() and len(manifest_csv(out)) == 1
    # the same names as zip members, plus one named like an old-style zip key
    members = {name: good.paths[(k, 0)] for k, name in enumerate(names[:7])}
    members["x.zip::y.dcm"] = Path(os.fsdecode(raw))
    archive = zip_with(tmp_path / "odd.zip", members)
    zout = tmp_path / "zout"
    zreport = ingest(archive, zout, workers=1)
    assert zreport.rejected == [] and len(zreport.volumes) == 1 and zreport.volumes[0]["n_files"] == 8
    assert_world_equal(zout / zreport.volumes[0]["volume"], good.truth, good.affine)
    # rerun: nothing re-read (the keys are stable), nothing rebuilt
    again = ingest(src, out, workers=1)
    assert (again.n_read, again.n_built) == (0, 0)


def test_dicomdir_references_outside_its_folder_refused(tmp_path: Path) -> None:
    """Class: DICOMDIR references that climb out of the DICOMDIR's folder (``..``, absolute) are refused."""
    import pydicom
    from pydicom.fileset import FileSet

    good = good_series(tmp_path / "good")
    outside = write_series(tmp_path / "outside", pattern(SHAPE, seed=4), Geometry(), tag="outside")
    fs = FileSet()
    for p in [*good.files, *outside.files[:3]]:
        fs.add(p)
    media = tmp_path / "media"
    fs.write(media)
    dicomdir = pydicom.dcmread(media / "DICOMDIR")
    victims = {str(ds.SOPInstanceUID) for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in outside.files[:3])}
    escapes = [["..", "outside", outside.files[0].name], [str(outside.files[1])],
               ["..\\..\\" + outside.files[2].name]]
    changed = 0
    for rec in dicomdir.DirectoryRecordSequence:
        if rec.get("ReferencedSOPInstanceUIDInFile") in victims:
            with pydicom.config.disable_value_validation():
                rec.ReferencedFileID = escapes[changed]
            changed += 1
    assert changed == 3
    dicomdir.save_as(media / "DICOMDIR")
    for rel in [r for r in media.rglob("*") if r.is_file() and r.name != "DICOMDIR"]:
        if pydicom.dcmread(rel, stop_before_pixels=True).SOPInstanceUID in victims:
            rel.unlink()  # the only copies now lie outside the media folder
    out = tmp_path / "out"
    report = ingest(media / "DICOMDIR", out, workers=1)
    refused = {p: r for p, r in rejected_csv(out).items() if "leaves the DICOMDIR's folder" in r}
    assert len(refused) == 3, rejected_csv(out)
    assert not [v for v in report.volumes if v["series_uid"] == outside.series_uid]
    used = {k for v in report.volumes for k in json.loads(v["files"])}
    assert not any(str(tmp_path / "outside") in k for k in used)
    assert_good_ingested(out, good, report)


# -- the output folder ---------------------------------------------------------------------------


def test_output_folder_locked_second_run_stops_with_one_line(tmp_path: Path) -> None:
    """Class: two runs into one --out: an exclusive lock; the second exits 2 with one line, the first's outputs stand."""
    from medpipe.io import folder_lock

    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src)
    out.mkdir()
    with folder_lock(out):  # as if another ingest were running
        res = run_cli("ingest", str(src), "--out", str(out), "--quiet", "--workers", "1")
        one_line_error(res, "in use by another medpipe ingest")
    assert not (out / "manifest.csv").exists()
    # two real runs at once: each finishes or stops with the one line; the survivor's manifest is whole
    procs = [subprocess.Popen(ingest_cmd(src, out, "--workers", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "in use by another medpipe ingest" in err and "Traceback" not in err), err
    for row in manifest_csv(out):
        assert (out / row["volume"]).is_file()
    assert_good_ingested(out, good)
    # a holder killed with -9 releases the lock at once, even if a child of it (a worker) lives on
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(holder.stdout.readline()) if holder.stdout else 0
    try:
        one_line_error(run_cli("ingest", str(src), "--out", str(out), "--quiet"), "in use by another medpipe ingest")
        holder.kill()
        holder.wait(timeout=30)
        assert _alive(child)
        res = run_cli("ingest", str(src), "--out", str(out), "--quiet", "--workers", "1")
        assert res.returncode == 0, res.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


_HOLD_LOCK = """
import os, sys, time
from medpipe.io import folder_lock
with folder_lock(sys.argv[1]):
    pid = os.fork()
    if pid == 0:  # a worker: it has the lock file open too
        time.sleep(60)
        os._exit(0)
    print(pid, flush=True)
    time.sleep(60)
"""


def test_out_is_a_file_one_line_error(tmp_path: Path) -> None:
    """Class: --out that is a file: one line, exit 2, nothing written."""
    src = tmp_path / "src"
    good_series(src)
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    one_line_error(run_cli("ingest", str(src), "--out", str(target), "--quiet"), "is a file")
    one_line_error(run_cli("ingest", str(src), "--out", str(target / "sub"), "--quiet"), "is a file")
    assert target.read_text() == "mine\n"
    # and the same source into a folder works
    res = run_cli("ingest", str(src), "--out", str(tmp_path / "ok"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ok" / "manifest.csv").is_file() and (tmp_path / "ok" / "rejected.csv").is_file()


def test_read_only_out_one_line_error(tmp_path: Path) -> None:
    """Class: a read-only --out (a read-only file system; as a user also a read-only folder): one line, exit 2."""
    src = tmp_path / "src"
    good_series(src)
    out = tmp_path / "ro"
    out.mkdir()
    res, why = run_on_tmpfs(out, "1m", ingest_cmd(src, out / "run"), read_only=True)
    if res is not None:
        one_line_error(res, "cannot write the output folder", "Read-only file system")
    elif os.geteuid() != 0:  # no private mounts here: a folder without write permission
        out.chmod(0o555)
        try:
            one_line_error(run_cli("ingest", str(src), "--out", str(out / "run"), "--quiet"), "Permission denied")
        finally:
            out.chmod(0o755)
    else:  # root without private mounts (a container without CAP_SYS_ADMIN): permissions do not stop root
        import warnings

        warnings.warn(f"no read-only file system here ({why}): writes refused by a file size limit instead",
                      stacklevel=1)
        res = _run_with_file_size_limit(ingest_cmd(src, out / "run"), 0)
        line = one_line_error(res, "cannot write the output folder")
        assert "File too large" in line or "disk I/O error" in line, line
    res = run_cli("ingest", str(src), "--out", str(tmp_path / "rw"), "--quiet")
    assert res.returncode == 0 and (tmp_path / "rw" / "manifest.csv").is_file(), res.stderr


def _run_with_file_size_limit(cmd: list[str], limit: int) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with RLIMIT_FSIZE ``limit``: writes beyond it fail with EFBIG (SIGXFSZ ignored)."""
    import resource

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, preexec_fn=cap, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_full_disk_one_line_error_and_no_temporaries(tmp_path: Path) -> None:
    """Class: --out on a full disk (a real 200 KB tmpfs): one line, exit 2, no temporary file left."""
    src = tmp_path / "src"
    big = write_series(src, pattern((128, 128, 24), noise=0), Geometry(), tag="big")  # 786 KB of voxels
    out = tmp_path / "small"
    out.mkdir()
    res, why = run_on_tmpfs(out, "200k", ingest_cmd(src, out, "--no-compress", "--workers", "1"))
    if res is None:  # no private mounts: a real write failure still, through the file size limit
        import warnings

        warnings.warn(f"no small file system here ({why}): writes stopped by a file size limit instead", stacklevel=1)
        res = _run_with_file_size_limit(ingest_cmd(src, out, "--no-compress", "--workers", "1"), 200_000)
        line = one_line_error(res, "cannot write the output folder")
        assert "File too large" in line or "disk I/O error" in line, line
        left = [p.name for p in out.rglob("*")]
    else:
        line = one_line_error(res, "cannot write the output folder")
        assert "No space left on device" in line or "database or disk is full" in line, line
        left = res.stdout.split("LEFT_IN_OUT:")[-1].split()
    assert not [n for n in left if n.startswith(TMP_PREFIX)], left
    # with room, the same command completes
    res = run_cli("ingest", str(src), "--out", str(tmp_path / "roomy"), "--no-compress", "--quiet")
    assert res.returncode == 0, res.stderr
    (row,) = manifest_csv(tmp_path / "roomy")
    assert_world_equal(tmp_path / "roomy" / row["volume"], big.truth, big.affine)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "random_pages"])
def test_corrupt_catalog_is_rebuilt(tmp_path: Path, damage: str) -> None:
    """Class: --out holding a corrupt catalog.sqlite: it is a cache, so it is rebuilt (exit 0, same outputs)."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src)
    (src / "junk.txt").write_text("not dicom\n")
    first = ingest(src, out, workers=1)
    before = {k: v for k, v in sha256_tree(out).items() if not k.startswith("catalog.sqlite")}
    cat = out / "catalog.sqlite"
    for extra in ("-wal", "-shm"):
        Path(f"{cat}{extra}").unlink(missing_ok=True)
    if damage == "garbage":
        cat.write_bytes(b"this is not an SQLite database\n" * 200)
    elif damage == "truncated":
        data = cat.read_bytes()
        cat.write_bytes(data[:4096] + bytes(len(data) - 4096))  # header kept, every page after it zeroed
    else:
        cat.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    res = run_cli("ingest", str(src), "--out", str(out), "--quiet", "--workers", "1")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    after = {k: v for k, v in sha256_tree(out).items() if not k.startswith("catalog.sqlite")}
    assert after == before
    assert_good_ingested(out, good, first)
    from medpipe.catalog import open_catalog

    with open_catalog(out) as c:
        assert c.counts()["files"] == len(good.files) + 1


def test_only_medpipes_own_temporaries_deleted(tmp_path: Path) -> None:
    """Class: ingest deletes only its own temporaries (a medpipe-specific prefix), never a user's file."""
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src)
    ingest(src, out, workers=1)
    users = [out / ".notes.tmp.txt", out / "volumes" / ".scan.abc.tmp.nii.gz", out / "a.tmp", out / ".tmp"]
    for p in users:
        p.write_text("the user's\n")
    # a link inside out to a user folder holding a file named like medpipe's: not followed
    mine = tmp_path / "user_folder"
    mine.mkdir()
    (mine / f"{TMP_PREFIX}xyz.tmp.keep.txt").write_text("the user's\n")
    (out / "link").symlink_to(mine, target_is_directory=True)
    stale = [out / f"{TMP_PREFIX}k1ll3d.tmp.manifest.csv", out / "volumes" / f"{TMP_PREFIX}k1ll3d.tmp.x.nii.gz"]
    for p in stale:
        p.write_text("half\n")
    report = ingest(src, out, workers=1)
    assert all(p.read_text() == "the user's\n" for p in users)
    assert (mine / f"{TMP_PREFIX}xyz.tmp.keep.txt").exists()
    assert not any(p.exists() for p in stale)
    assert_good_ingested(out, good, report)


def test_workers_capped_at_work_and_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Class: --workers 24 on few cores for 3 chunks of work: never more processes than work or CPUs."""
    import concurrent.futures

    import medpipe.ingest as ingest_mod
    import medpipe.workers as workers_mod

    assert ingest_mod.pool_size(24, 3) == min(3, ingest_mod.available_cpus())
    assert ingest_mod.pool_size(24, 1) == 1 and ingest_mod.pool_size(1, 50) == 1
    sizes: list[int] = []

    class Recording(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, max_workers: int | None = None, **kw: Any) -> None:
            sizes.append(int(max_workers or 0))
            super().__init__(max_workers=max_workers, **kw)

    monkeypatch.setattr(workers_mod, "ProcessPoolExecutor", Recording)
    monkeypatch.setattr(ingest_mod, "SCAN_CHUNK", 3)  # 8 + 1 files: 3 chunks of header work
    src, out = tmp_path / "src", tmp_path / "out"
    good = good_series(src)
    (src / "junk.txt").write_text("not dicom\n")
    report = ingest(src, out, workers=24)
    cpus = ingest_mod.available_cpus()
    assert all(1 < s <= min(3, cpus) for s in sizes), sizes
    assert len(sizes) == (1 if cpus > 1 else 0)  # the scan only: one series is built in-process
    assert_good_ingested(out, good, report)


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids.update(int(c) for c in fh.read().split())
    except OSError:
        pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


_SLOW_INGEST = """
import sys, time
import medpipe.ingest as m
real = m._scan_one
def slow(f):
    time.sleep(0.3)  # each header takes a while: the workers are busy when their parent dies
    return real(f)
m._scan_one = slow
m.SCAN_CHUNK = 8
m.ingest(sys.argv[1], sys.argv[2], workers=2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent(tmp_path: Path) -> None:
    """Class: workers die with their parent: kill -9 the main process, no worker survives it."""
    import medpipe.ingest as ingest_mod

    if ingest_mod.available_cpus() < 2:
        pytest.skip("one CPU: ingest starts no worker processes here")
    src = tmp_path / "src"
    good_series(src)
    write_series(src / "more", pattern(SHAPE, seed=7), Geometry(), tag="more")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INGEST, str(src), str(tmp_path / "out")], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) == 2, "the ingest started no workers"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5  # a worker's chunk alone takes 8 x 0.3 s
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"workers {survivors} outlived their parent"
    finally:
        for w in _children(proc.pid) | workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_rich_markup_in_header_text_and_paths_printed_plain(tmp_path: Path) -> None:
    """Class: console markup: ``[/]`` in SeriesDescription or --out never crashes ``ingest`` or ``catalog``."""
    from typer.testing import CliRunner

    from medpipe.cli import app

    src = tmp_path / "src"
    good = good_series(src / "good")
    hostile = write_series(src / "hostile", pattern(SHAPE, seed=8), Geometry(origin=(0.0, 0.0, 300.0)), tag="h",
                           series_description="[/] [bold]x[/bold] [link=file:///etc/passwd]y[/link] [", patient_id="[/]")
    variant(good.files[0], src / "bad.dcm", "[/]", Rows=0)  # a rejection reason in the summary
    out = tmp_path / "out [/] [red]"
    runner = CliRunner()
    wide = {"COLUMNS": "400"}  # one table row per line
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "1"], env=wide)
    assert res.exit_code == 0, res.output
    assert res.exception is None
    assert "[/] [bold]x[/bold] [link=file:///etc/passwd]y[/link] [" in res.output
    assert f"Series in {out}" in res.output
    res = runner.invoke(app, ["catalog", str(out)], env=wide)
    assert res.exit_code == 0, res.output
    assert "[/] [bold]x[/bold] [link=file:///etc/passwd]y[/link] [" in res.output and str(out) in res.output
    assert_good_ingested(out, good)
    (row,) = [r for r in manifest_csv(out) if r["series_uid"] == hostile.series_uid]
    assert row["status"] == "ok"
