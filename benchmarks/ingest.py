#!/usr/bin/env python
"""Benchmark ``medpipe ingest`` against dcm2niix and SimpleITK on synthetic DICOM.

    python benchmarks/ingest.py [--workdir DIR] [--slices 300] [--export-files 5000] [--keep]

What it does (see ``benchmarks/README.md`` for how to read the output):

1. Builds deterministic (seeded) synthetic inputs in ``--workdir`` and caches them there, so a
   re-run reuses them:
   a. one CT series, ``--slices`` slices of 512 x 512 (one file per slice, random file names);
   b. a nested multi-patient "PACS export" of ``--export-files`` files (CT and MR series of
      128 x 128 / 256 x 256, 20-80 slices each).
2. Times, on the same inputs, with a warm page cache, every tool in a child process:
   medpipe's ``ingest`` (Python API, a fresh output folder per run), ``dcm2niix``, SimpleITK's
   ``ImageSeriesReader`` and, for header reading, a plain ``pydicom.dcmread(stop_before_pixels=True)``
   loop. Peak memory comes from GNU ``time`` (largest single process, workers included once
   reaped) and from sampling the RSS / PSS of the whole process tree; a second medpipe ingest of
   half the export shows how memory grows with the number of files.
3. Checks that medpipe's and dcm2niix's (and SimpleITK's) volumes hold the same voxel values in
   world space, prints a table with ratios and PASS/MISS per target, and writes everything to
   ``benchmarks/results/ingest.json``.

Only the standard library, numpy, pydicom, nibabel, SimpleITK and the dcm2niix binary are used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ingest.json"
GEN_VERSION = 2  # bump when the generated inputs change, so cached inputs are rebuilt
MB = 1e6

# Targets
TARGET_FILES_PER_S = 2000.0
#: uncompressed conversion of the single CT: medpipe's time at most this many times dcm2niix -z n's
TARGET_NII_RATIO = 1.5
#: peak memory budget per process: baseline (interpreter + libraries) + this many copies of the
#: largest series' voxel array + a fixed allowance for per-file metadata (headers, catalog rows).
MEM_ARRAY_FACTOR = 3.0
MEM_FIXED_ALLOWANCE_MB = 64.0


# ----------------------------------------------------------------------------------------------
# synthetic DICOM
# ----------------------------------------------------------------------------------------------

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class SeriesSpec:
    folder: str  # relative to the input root
    patient_id: str
    patient_name: str
    study_key: str
    study_date: str
    accession: str
    series_number: int
    description: str
    modality: str  # CT or MR
    rows: int
    columns: int
    n_slices: int
    spacing: tuple[float, float]  # PixelSpacing [row, column]
    thickness: float
    iop: tuple[float, ...]
    origin: tuple[float, float, float]  # IPP of the first slice (by position)
    step: float  # signed distance between slices along the normal
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def array_bytes(self) -> int:
        return self.rows * self.columns * self.n_slices * 2


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medpipe-bench", *map(str, parts)])


def _phantom_slice(spec: SeriesSpec, k: int, rng: np.random.Generator) -> np.ndarray:
    """Stored values (rows, columns) of slice ``k``: a smooth asymmetric body phantom plus noise."""
    rows, cols = spec.rows, spec.columns
    # normalised in-plane coordinates in [-1, 1] and a through-plane coordinate in [-1, 1]
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    z = -1.0 + 2.0 * k / max(spec.n_slices - 1, 1)
    body = (x / 0.82) ** 2 + ((y + 0.05) / 0.62) ** 2 + (z / 1.3) ** 2 < 1.0
    organ = ((x - 0.3) / 0.25) ** 2 + ((y + 0.1) / 0.2) ** 2 + ((z - 0.2) / 0.5) ** 2 < 1.0
    bone = ((x + 0.35) / 0.09) ** 2 + ((y - 0.3) / 0.12) ** 2 < 1.0
    ramp = 30.0 * x + 15.0 * y + 20.0 * z  # smooth gradient: makes every axis flip visible
    if spec.modality == "CT":
        hu = np.full((rows, cols), -1000.0)
        hu[body] = 40.0 + ramp[body]
        hu[organ] = 120.0 + ramp[organ]
        hu[bone & body] = 900.0 + 2 * ramp[bone & body]
        hu += rng.normal(0.0, 12.0, size=hu.shape)
        stored = np.clip(np.rint(hu + 1024.0), -1024, 3071)  # RescaleIntercept -1024, slope 1
        return stored.astype(np.int16)
    sig = np.zeros((rows, cols))
    sig[body] = 600.0 + 4 * ramp[body]
    sig[organ] = 1100.0 + 4 * ramp[organ]
    sig[bone & body] = 150.0
    sig += np.abs(rng.normal(0.0, 20.0, size=sig.shape))
    return np.clip(np.rint(sig), 0, 4095).astype(np.uint16)


def _write_series(root: Path, spec: SeriesSpec) -> int:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(spec.seed)
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    sop_class = CT_STORAGE if spec.modality == "CT" else MR_STORAGE
    study_uid = _uid("study", spec.study_key)
    series_uid = _uid("series", spec.study_key, spec.series_number)
    for_uid = _uid("for", spec.study_key)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "MEDPIPE_BENCH"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AccessionNumber = spec.accession
    ds.Modality = spec.modality
    ds.Manufacturer = "SYNTHETIC"
    ds.ManufacturerModelName = "medpipe-bench"
    ds.InstitutionName = "Benchmark Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "BENCHMARK STUDY"
    ds.SeriesDescription = spec.description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "050Y"
    ds.BodyPartExamined = "CHEST" if spec.modality == "CT" else "BRAIN"
    ds.SliceThickness = f"{spec.thickness:g}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = spec.study_key[-6:]
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [f"{v:g}" for v in spec.iop]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [f"{v:g}" for v in spec.spacing]
    ds.BitsAllocated = 16
    if spec.modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "12"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = "3"
        ds.FlipAngle = "90"
        ds.SpacingBetweenSlices = f"{abs(spec.step):g}"
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
    normal = np.cross(spec.iop[:3], spec.iop[3:6])
    # random, position-independent file names; InstanceNumber follows the acquisition order
    names = [f"IM{int(v):08x}.dcm" for v in rng.choice(2**32, size=spec.n_slices, replace=False)]
    for k in range(spec.n_slices):
        ipp = np.asarray(spec.origin) + k * spec.step * normal
        sop_uid = _uid("sop", spec.study_key, spec.series_number, k)
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.SliceLocation = f"{float(ipp @ normal):.4f}"
        ds.PixelData = _phantom_slice(spec, k, rng).tobytes()
        ds["PixelData"].VR = "OW"
        pydicom.dcmwrite(folder / names[k], ds, enforce_file_format=True)
    return spec.n_slices


def _single_spec(n_slices: int) -> SeriesSpec:
    return SeriesSpec(
        folder="series", patient_id="BENCH0001", patient_name="Bench^Single", study_key="single",
        study_date="20240115", accession="ACC000001", series_number=3, description="CHEST 1.0 B30f",
        modality="CT", rows=512, columns=512, n_slices=n_slices, spacing=(0.703125, 0.703125),
        thickness=1.0, iop=(1, 0, 0, 0, 1, 0), origin=(-179.6, -195.2, -12.5), step=-1.0, seed=1234,
    )


def _export_specs(n_files: int, seed: int = 20240601) -> list[SeriesSpec]:
    """A deterministic mix of CT and MR series spread over ~n_files/125 patients, n_files in total."""
    rng = np.random.default_rng(seed)
    n_patients = max(1, round(n_files / 125))
    specs: list[SeriesSpec] = []
    total = 0
    i = 0
    while total < n_files:
        p = i % n_patients
        study = int(rng.integers(0, 2))
        modality = "CT" if rng.random() < 0.5 else "MR"
        matrix = int(rng.choice([128, 256]))
        n = int(rng.integers(20, 81))
        n = min(n, n_files - total)
        pid = f"PAT{p + 1:04d}"
        study_key = f"{pid}-S{study}"
        series_number = i // n_patients + 1 + 100 * study
        if modality == "CT":
            iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0)
            fov = float(rng.uniform(300, 420))
            desc, thickness, step = "ABD 5mm", 5.0, -5.0
        else:
            plane = int(rng.integers(0, 3))
            iop = [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1)][plane]
            fov = float(rng.uniform(200, 260))
            desc = ["T1 AX", "T2 SAG", "FLAIR COR"][plane]
            thickness = float(rng.choice([3.0, 4.0]))
            step = thickness + 0.3
        sp = round(fov / matrix, 6)
        origin = (-fov / 2 + float(rng.uniform(-5, 5)), -fov / 2 + float(rng.uniform(-5, 5)), float(rng.uniform(-80, 80)))
        study_date = (datetime.date(2023, 1, 2) + datetime.timedelta(days=212 * study + 3 * p)).strftime("%Y%m%d")
        specs.append(SeriesSpec(
            folder=f"{pid}/{study_date}_{study_key}/{series_number:03d}_{desc.replace(' ', '_')}",
            patient_id=pid, patient_name=f"Bench^Patient{p + 1:04d}", study_key=study_key,
            study_date=study_date, accession=f"ACC{p + 1:04d}{study}",
            series_number=series_number, description=desc, modality=modality, rows=matrix, columns=matrix,
            n_slices=n, spacing=(sp, sp), thickness=thickness, iop=iop, origin=origin, step=step,
            seed=seed + i,
        ))
        total += n
        i += 1
    return specs


def ensure_inputs(root: Path, specs: list[SeriesSpec], what: str) -> None:
    """Generate ``specs`` under ``root`` unless a completed copy with the same specs is cached there."""
    marker = root.parent / f".{root.name}.complete.json"  # outside the tree: it is not an input
    key = {"version": GEN_VERSION, "specs": [s.__dict__ for s in specs]}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == json.loads(json.dumps(key)):
                print(f"  {what}: cached in {root}")
                return
        except ValueError:
            pass
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    n = 0
    for spec in specs:
        n += _write_series(root, spec)
    marker.write_text(json.dumps(key))
    print(f"  {what}: generated {n} files in {time.perf_counter() - t0:.1f} s ({root})")


def link_subset(src: Path, dst: Path, fraction: float = 0.5) -> None:
    """Hard-link the first ``fraction`` of the patient folders of ``src`` into ``dst`` (cached)."""
    patients = sorted(p.name for p in src.iterdir() if p.is_dir())
    keep = patients[: max(1, int(len(patients) * fraction))]
    marker = dst.parent / f".{dst.name}.complete.json"
    key = {"src": str(src), "patients": keep, "src_mtime": (src.parent / f".{src.name}.complete.json").stat().st_mtime_ns}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return
    if dst.exists():
        shutil.rmtree(dst)
    for name in keep:
        for dirpath, _, names in os.walk(src / name):
            target = dst / Path(dirpath).relative_to(src)
            target.mkdir(parents=True, exist_ok=True)
            for n in names:
                try:
                    os.link(os.path.join(dirpath, n), target / n)
                except OSError:
                    shutil.copy2(os.path.join(dirpath, n), target / n)
    marker.write_text(json.dumps(key))


def tree_bytes(root: Path, suffixes: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(number of files, total bytes) under ``root``, optionally only files ending in ``suffixes``."""
    n = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            n += 1
            size += os.path.getsize(os.path.join(dirpath, name))
    return n, size


def warm_cache(root: Path) -> None:
    """Read every input file once so that all tools are timed with a warm page cache."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as fh:
                while fh.read(1 << 20):
                    pass


# ----------------------------------------------------------------------------------------------
# running and measuring child processes
# ----------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.05, skip_root: bool = False) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.skip_root = pid, interval, skip_root
        self.peak_rss_kb = self.peak_pss_kb = self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            pids = _descendants(self.pid)[1 if self.skip_root else 0 :]
            vals = [_rss_pss_kb(p) for p in pids]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(v[0] for v in vals))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(v[1] for v in vals))
            self.max_procs = max(self.max_procs, len(pids))
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class ChildResult:
    wall: float
    rc: int
    maxrss_mb: float  # largest single process of the tree (wait4; reaped descendants included)
    tree_rss_mb: float  # sampled peak of the summed RSS of the tree
    tree_pss_mb: float  # sampled peak of the summed PSS of the tree (shared pages counted once)
    procs: int
    stdout: str
    stderr: str

    def json_line(self) -> dict[str, Any]:
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"child printed no JSON result (rc={self.rc}):\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}")


TIME_BIN = "/usr/bin/time"  # GNU time: reports the child's own peak RSS


def run_child(cmd: list[str], *, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``cmd``, measuring wall time, peak RSS (largest process) and the sampled tree RSS / PSS.

    The peak RSS comes from GNU ``time`` (``%M``): ``wait4`` in *this* process would not do,
    because Linux folds the RSS of the forked-but-not-yet-exec'd copy of this (large) process into
    the child's ``ru_maxrss``. Without GNU time, ``wait4`` is used and the number is an upper bound.
    """
    use_time = os.access(TIME_BIN, os.X_OK)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".time") as tfile:
        full = [TIME_BIN, "-f", "%M", "-o", tfile.name, *cmd] if use_time else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, text=True, env=env)
        sampler = TreeSampler(proc.pid, skip_root=use_time)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        maxrss_kb = ru.ru_maxrss
        if use_time:
            lines = [ln for ln in tfile.read().split() if ln.isdigit()]
            maxrss_kb = int(lines[-1]) if lines else 0
        out.seek(0)
        err.seek(0)
        return ChildResult(
            wall, proc.returncode, maxrss_kb * 1024 / MB, sampler.peak_rss_kb * 1024 / MB,
            sampler.peak_pss_kb * 1024 / MB, sampler.max_procs, out.read(), err.read(),
        )


CHILD_BASELINE = """
import json, time
import numpy, pydicom, nibabel, nibabel.nifti1
import medpipe.ingest, medpipe.dicom.volume, medpipe.catalog
print(json.dumps({"ok": True}))
"""

CHILD_MEDPIPE = """
import collections, json, sys, time
t0 = time.perf_counter()
from medpipe.ingest import ingest
t_import = time.perf_counter() - t0
src, out, compress, workers = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]) or None
rep = ingest(src, out, compress=compress, workers=workers)
print(json.dumps({
    "import_s": t_import, "seconds": rep.seconds, "n_files": rep.n_files, "n_read": rep.n_read,
    "n_built": rep.n_built, "n_volumes": len(rep.volumes), "n_rejected": len(rep.rejected),
    "rejected_sample": rep.rejected[:5],
    "status": dict(collections.Counter(v["status"] for v in rep.volumes)),
    "reasons_sample": sorted({v["reasons"] for v in rep.volumes if v["reasons"]})[:5],
    "volumes": [{"shape": v["shape"], "volume": v["volume"], "status": v["status"]} for v in rep.volumes[:3]],
}))
"""

CHILD_SITK = """
import json, sys, time
t0 = time.perf_counter()
import SimpleITK as sitk
t1 = time.perf_counter()
src, dst = sys.argv[1], sys.argv[2]
reader = sitk.ImageSeriesReader()
names = reader.GetGDCMSeriesFileNames(src)
reader.SetFileNames(names)
img = reader.Execute()
t2 = time.perf_counter()
sitk.WriteImage(img, dst)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t1,
                  "n_files": len(names), "size": list(img.GetSize()), "pixel": img.GetPixelIDTypeAsString(),
                  "threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}))
"""

CHILD_PYDICOM = """
import json, multiprocessing, os, sys, time
t0 = time.perf_counter()
import pydicom
t_import = time.perf_counter() - t0

def read(paths):
    n = 0
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        # touch what an indexer needs (forces parsing of the deferred raw elements)
        _ = (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID,
             ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.Rows)
        n += 1
    return n

src, procs = sys.argv[1], int(sys.argv[2])
t1 = time.perf_counter()
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if not f.startswith("."))
if procs <= 1:
    n = read(files)
else:
    chunks = [files[i:i + 64] for i in range(0, len(files), 64)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        n = sum(pool.map(read, chunks))
t2 = time.perf_counter()
print(json.dumps({"import_s": t_import, "total_s": t2 - t1, "n_files": n}))
"""


def py(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


@dataclass
class Measure:
    label: str
    seconds: list[float] = field(default_factory=list)  # primary time (API / in-process, or wall)
    walls: list[float] = field(default_factory=list)  # process wall clock incl. start-up
    out_bytes: int = 0
    maxrss_mb: float = 0.0
    tree_pss_mb: float = 0.0
    tree_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, seconds: float, res: ChildResult, out_bytes: int) -> None:
        self.seconds.append(seconds)
        self.walls.append(res.wall)
        self.out_bytes = out_bytes
        self.maxrss_mb = max(self.maxrss_mb, res.maxrss_mb)
        self.tree_pss_mb = max(self.tree_pss_mb, res.tree_pss_mb)
        self.tree_rss_mb = max(self.tree_rss_mb, res.tree_rss_mb)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "median_s": self.median, "best_s": self.best, "runs_s": self.seconds,
            "wall_median_s": self.wall, "walls_s": self.walls, "out_mb": self.out_bytes / MB,
            "peak_maxrss_mb": self.maxrss_mb, "peak_tree_pss_mb": self.tree_pss_mb,
            "peak_tree_rss_mb": self.tree_rss_mb, **self.extra,
        }


def _check(res: ChildResult, what: str) -> None:
    if res.rc != 0:
        raise RuntimeError(f"{what} failed (rc={res.rc}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_medpipe(m: Measure, src: Path, out: Path, compress: bool, workers: int) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    res = run_child(py(CHILD_MEDPIPE, src, out, int(compress), workers))
    _check(res, f"medpipe ingest {src}")
    info = res.json_line()
    suffix = (".nii.gz",) if compress else (".nii",)
    m.add(info["seconds"]["total"], res, tree_bytes(out / "volumes", suffix)[1] if (out / "volumes").exists() else 0)
    m.extra.setdefault("scan_s", []).append(info["seconds"]["scan"])
    m.extra.setdefault("build_s", []).append(info["seconds"]["build"])
    m.extra.setdefault("import_s", []).append(info["import_s"])
    m.extra["last_report"] = {k: v for k, v in info.items() if k not in ("seconds",)}
    return info


def run_dcm2niix(m: Measure, src: Path, out: Path, z: str, level: int | None, name: str) -> ChildResult:
    _fresh(out)
    cmd = ["dcm2niix", "-z", z, *([f"-{level}"] if level else []), "-o", str(out), "-f", name, str(src)]
    res = run_child(cmd)
    _check(res, " ".join(cmd))
    m.add(res.wall, res, tree_bytes(out, (".nii", ".nii.gz"))[1])
    m.extra["cmd"] = " ".join(cmd[:-1] + ["SRC"]).replace(str(out), "OUT")
    m.extra["compressor_lines"] = [ln.strip() for ln in res.stdout.splitlines() if "ompress" in ln or "pigz" in ln][:3]
    m.extra["n_outputs"] = tree_bytes(out, (".nii", ".nii.gz"))[0]
    return res


def run_sitk(m: Measure, src: Path, out: Path, suffix: str) -> dict[str, Any]:
    _fresh(out)
    dst = out / f"series{suffix}"
    res = run_child(py(CHILD_SITK, src, dst))
    _check(res, "SimpleITK")
    info = res.json_line()
    m.add(info["total_s"], res, dst.stat().st_size)
    m.extra["last"] = info
    return info


# ----------------------------------------------------------------------------------------------
# correctness: same voxels in world space
# ----------------------------------------------------------------------------------------------


def compare_world(a_path: Path, b_path: Path) -> dict[str, Any]:
    """Compare two NIfTI volumes of the same grid, possibly with permuted / flipped axes.

    The voxel -> voxel map ``inv(B) @ A`` must be a signed permutation with integer offsets; the
    second image is re-indexed onto the first grid and the scaled values compared.
    """
    import nibabel as nib

    a_img, b_img = nib.load(a_path), nib.load(b_path)
    m = np.linalg.inv(b_img.affine) @ a_img.affine
    r = m[:3, :3]
    perm_ok = np.allclose(np.abs(r).round(), np.abs(r), atol=1e-3) and np.allclose(np.abs(r).round().sum(0), 1)
    res: dict[str, Any] = {
        "a": str(a_path), "b": str(b_path), "a_shape": list(a_img.shape), "b_shape": list(b_img.shape),
        "voxel_map": np.round(m, 4).tolist(),
    }
    if not perm_ok or len(a_img.shape) != 3 or len(b_img.shape) != 3:
        res.update(ok=False, why="grids are not the same up to axis permutation / flips")
        return res
    offsets = m[:3, 3]
    if not np.allclose(offsets, offsets.round(), atol=1e-2):
        res.update(ok=False, why=f"grids are offset by a fraction of a voxel: {offsets.tolist()}")
        return res
    a = a_img.get_fdata(dtype=np.float32)  # scl_slope / scl_inter applied; exact for these integers
    b = b_img.get_fdata(dtype=np.float32)
    # index into b for every index of a, axis by axis: q_b = r @ p_a + t
    perm = [int(np.argmax(np.abs(r[:, ax]))) for ax in range(3)]  # b axis for each a axis
    idx = []
    for ax in range(3):
        bax = perm[ax]
        sign = int(np.sign(r[bax, ax]))
        idx.append(sign * np.arange(a.shape[ax]) + int(round(offsets[bax])))
    inside = [(i >= 0) & (i < b.shape[perm[ax]]) for ax, i in enumerate(idx)]
    bt = np.transpose(b, perm)  # axis ax of bt == axis perm[ax] of b
    sub_a = a[np.ix_(*[np.nonzero(m_)[0] for m_ in inside])]
    sub_b = bt[np.ix_(*[i[m_] for i, m_ in zip(idx, inside)])]
    diff = np.abs(sub_a - sub_b)
    n_common = int(sub_a.size)
    res.update(
        ok=bool(n_common == a.size == b.size and diff.max() < 1e-3),
        common_voxels=n_common, a_voxels=int(a.size), b_voxels=int(b.size),
        max_abs_diff=float(diff.max()) if n_common else None,
        n_mismatch=int((diff >= 1e-3).sum()),
        a_range=[float(a.min()), float(a.max())], b_range=[float(b.min()), float(b.max())],
        b_axes_for_a=perm,
    )
    return res


def spot_check_dicom(nii: Path, series_dir: Path, n: int = 3) -> dict[str, Any]:
    """Independent check against pydicom: a few slices' HU values at the voxel their IPP maps to."""
    import nibabel as nib
    import pydicom

    img = nib.load(nii)
    data = img.get_fdata(dtype=np.float64)
    inv = np.linalg.inv(img.affine)
    files = sorted(p for p in series_dir.iterdir() if p.suffix == ".dcm")
    worst = 0.0
    checked = []
    for p in files[:: max(1, len(files) // n)][:n]:
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        rows, cols = hu.shape
        jj, ii = np.mgrid[0:rows, 0:cols]  # DICOM (row, column) of every pixel
        lps = ipp[:, None] + iop[:3, None] * (ii.ravel() * dc) + iop[3:, None] * (jj.ravel() * dr)
        ras = np.vstack([-lps[0], -lps[1], lps[2], np.ones(lps.shape[1])])
        vox = np.rint(inv @ ras)[:3].astype(int)
        got = data[vox[0], vox[1], vox[2]]
        worst = max(worst, float(np.abs(got - hu.ravel()).max()))
        checked.append(p.name)
    return {"ok": worst < 1e-3, "max_abs_diff": worst, "files": checked}


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def _cpu_busy_s() -> float:
    """Seconds of CPU time all processes of the machine have used (from /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            f = fh.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "medpipe"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        return head + (f" + {len(dirty)} uncommitted change(s) under medpipe/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def profile_medpipe(src: Path, out: Path, compress: bool, dest: Path, top: int = 40) -> None:
    """cProfile one in-process ingest with workers=1 (all work in one process) into ``dest``."""
    import cProfile
    import io
    import pstats

    from medpipe.ingest import ingest

    if out.exists():
        shutil.rmtree(out)
    prof = cProfile.Profile()
    prof.enable()
    rep = ingest(src, out, workers=1, compress=compress)
    prof.disable()
    buf = io.StringIO()
    buf.write(f"ingest({src}, workers=1, compress={compress}) seconds={rep.seconds}\n")
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(buf.getvalue())
    shutil.rmtree(out, ignore_errors=True)
    print(f"  profile written to {dest}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medpipe-bench-ingest",
                    help="inputs are cached here; outputs go to DIR/out (default: %(default)s)")
    ap.add_argument("--slices", type=int, default=300, help="slices of the 512x512 CT series (default 300)")
    ap.add_argument("--export-files", type=int, default=5000, help="files in the PACS export (default 5000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per single-series tool (median reported)")
    ap.add_argument("--export-repeat", type=int, default=1, help="timed runs per export tool")
    ap.add_argument("--workers", type=int, default=0, help="medpipe workers (default: medpipe's own choice)")
    ap.add_argument("--json", type=Path, default=RESULTS, help="where to write the results (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs in DIR/out")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile medpipe (workers=1) on both inputs; text next to the JSON")
    args = ap.parse_args(argv)

    import nibabel
    import pydicom
    import SimpleITK

    import medpipe

    if shutil.which("dcm2niix") is None:
        print("dcm2niix is not on PATH (pip install dcm2niix)", file=sys.stderr)
        return 2
    work = args.workdir.expanduser().resolve()
    single_dir, export_dir, out_root = work / "inputs" / "single", work / "inputs" / "export", work / "out"
    ncpu = os.cpu_count() or 1
    workers = args.workers or min(ncpu, 8)
    dcm2niix_version = subprocess.run(["dcm2niix", "-v"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    pigz = shutil.which("pigz")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    busy0, own0 = _cpu_busy_s(), _own_cpu_s()

    print("Inputs")
    single = _single_spec(args.slices)
    export_specs = _export_specs(args.export_files)
    ensure_inputs(single_dir, [single], f"single series ({args.slices} x 512x512 CT)")
    ensure_inputs(export_dir, export_specs, f"PACS export ({args.export_files} files)")
    half_dir = work / "inputs" / "export_half"  # for the memory-scaling check: half the patients
    link_subset(export_dir, half_dir)
    n_single, single_bytes = tree_bytes(single_dir)
    n_export, export_bytes = tree_bytes(export_dir)
    largest_export = max(export_specs, key=lambda s: s.array_bytes)
    export_series = len(export_specs)
    export_patients = len({s.patient_id for s in export_specs})
    export_studies = len({s.study_key for s in export_specs})
    export_pixels = sum(s.array_bytes for s in export_specs)
    print(f"  single: {n_single} files, {single_bytes / MB:.0f} MB; export: {n_export} files, {export_bytes / MB:.0f} MB, "
          f"{export_patients} patients, {export_studies} studies, {export_series} series "
          f"({sum(s.modality == 'CT' for s in export_specs)} CT, {sum(s.modality == 'MR' for s in export_specs)} MR)")
    print("  warming the page cache ...")
    warm_cache(single_dir)
    warm_cache(export_dir)

    baseline = run_child(py(CHILD_BASELINE))
    _check(baseline, "baseline")
    base_mb = baseline.maxrss_mb
    print(f"  baseline process (python + numpy/pydicom/nibabel/medpipe imported): {base_mb:.0f} MB RSS")

    # -- single series -----------------------------------------------------------------------
    print(f"Single series: {args.repeat} run(s) per tool, interleaved ...")
    S: dict[str, Measure] = {
        "mp_nii": Measure("medpipe ingest -> .nii"),
        "d_n": Measure("dcm2niix -z n"),
        "sitk_nii": Measure("SimpleITK series -> .nii"),
        "mp_gz": Measure("medpipe ingest -> .nii.gz"),
        "d_y": Measure("dcm2niix -z y" + ("" if pigz else " (no pigz on PATH)")),
        "d_i": Measure("dcm2niix -z i (zlib level 6)"),
        "d_i1": Measure("dcm2niix -z i -1 (zlib level 1)"),
        "sitk_gz": Measure("SimpleITK series -> .nii.gz"),
    }
    o = out_root / "single"
    for rep in range(args.repeat):
        run_medpipe(S["mp_nii"], single_dir, o / "medpipe_nii", False, workers)
        run_dcm2niix(S["d_n"], single_dir, o / "dcm2niix_n", "n", None, "%s")
        run_sitk(S["sitk_nii"], single_dir / "series", o / "sitk_nii", ".nii")
        run_medpipe(S["mp_gz"], single_dir, o / "medpipe_gz", True, workers)
        run_dcm2niix(S["d_y"], single_dir, o / "dcm2niix_y", "y", None, "%s")
        run_dcm2niix(S["d_i"], single_dir, o / "dcm2niix_i", "i", None, "%s")
        run_dcm2niix(S["d_i1"], single_dir, o / "dcm2niix_i1", "i", 1, "%s")
        run_sitk(S["sitk_gz"], single_dir / "series", o / "sitk_gz", ".nii.gz")
        print(f"  run {rep + 1}: medpipe .nii {S['mp_nii'].seconds[-1]:.2f} s, dcm2niix -z n {S['d_n'].seconds[-1]:.2f} s, "
              f"medpipe .nii.gz {S['mp_gz'].seconds[-1]:.2f} s, dcm2niix -z y {S['d_y'].seconds[-1]:.2f} s")

    # correctness of the single series
    checks: dict[str, Any] = {}
    mp_vol = o / "medpipe_nii" / S["mp_nii"].extra["last_report"]["volumes"][0]["volume"]
    mp_gz_vol = o / "medpipe_gz" / S["mp_gz"].extra["last_report"]["volumes"][0]["volume"]
    d_vol = next((o / "dcm2niix_n").glob("*.nii"))
    dz_vol = next((o / "dcm2niix_y").glob("*.nii.gz"))
    checks["medpipe_nii_vs_dcm2niix"] = compare_world(mp_vol, d_vol)
    checks["medpipe_niigz_vs_dcm2niix_gz"] = compare_world(mp_gz_vol, dz_vol)
    checks["sitk_nii_vs_dcm2niix"] = compare_world(o / "sitk_nii" / "series.nii", d_vol)
    checks["medpipe_vs_pydicom_slices"] = spot_check_dicom(mp_vol, single_dir / "series")
    for name, meas in (("medpipe_nii", S["mp_nii"]), ("medpipe_gz", S["mp_gz"])):
        rep_ = meas.extra["last_report"]
        checks[f"{name}_report"] = {
            "ok": rep_["n_volumes"] == 1 and rep_["n_rejected"] == 0 and rep_["status"] == {"ok": 1},
            "status": rep_["status"], "n_rejected": rep_["n_rejected"], "reasons": rep_["reasons_sample"],
            "shape": rep_["volumes"][0]["shape"],
        }

    # -- export --------------------------------------------------------------------------------
    print(f"PACS export: {args.export_repeat} run(s) per tool ...")
    E: dict[str, Measure] = {
        "mp_nii": Measure("medpipe ingest -> .nii"),
        "mp_gz": Measure("medpipe ingest -> .nii.gz"),
        "d_n": Measure("dcm2niix -z n"),
        "pyd1": Measure("pydicom dcmread(stop_before_pixels) 1 proc"),
        "pydN": Measure(f"pydicom dcmread(stop_before_pixels) {workers} procs"),
    }
    oe = out_root / "export"
    for rep in range(args.export_repeat):
        run_medpipe(E["mp_nii"], export_dir, oe / "medpipe_nii", False, workers)
        run_medpipe(E["mp_gz"], export_dir, oe / "medpipe_gz", True, workers)
        run_dcm2niix(E["d_n"], export_dir, oe / "dcm2niix_n", "n", None, "%i_%j")
        if rep == 0:  # memory scaling: the same ingest on half of the export
            E["mp_half"] = Measure("medpipe ingest -> .nii, half the export")
            run_medpipe(E["mp_half"], half_dir, oe / "medpipe_half", False, workers)
        for key, procs in (("pyd1", 1), ("pydN", workers)):
            res = run_child(py(CHILD_PYDICOM, export_dir, procs))
            _check(res, "pydicom loop")
            info = res.json_line()
            E[key].add(info["total_s"], res, 0)
            E[key].extra["n_files"] = info["n_files"]
        print(f"  run {rep + 1}: medpipe .nii total {E['mp_nii'].seconds[-1]:.2f} s (scan {E['mp_nii'].extra['scan_s'][-1]:.2f} s), "
              f"dcm2niix -z n {E['d_n'].seconds[-1]:.2f} s, pydicom loop {E['pyd1'].seconds[-1]:.2f} s")
    for name, meas in (("export_medpipe_nii", E["mp_nii"]), ("export_medpipe_gz", E["mp_gz"])):
        rep_ = meas.extra["last_report"]
        checks[f"{name}_report"] = {
            "ok": rep_["n_volumes"] == export_series and rep_["n_rejected"] == 0 and rep_["status"] == {"ok": export_series},
            "expected_volumes": export_series, "n_volumes": rep_["n_volumes"], "status": rep_["status"],
            "n_rejected": rep_["n_rejected"], "rejected_sample": rep_["rejected_sample"], "reasons": rep_["reasons_sample"],
        }
    checks["export_dcm2niix_outputs"] = {"ok": E["d_n"].extra["n_outputs"] == export_series,
                                        "n_outputs": E["d_n"].extra["n_outputs"], "expected": export_series}

    # -- summary -------------------------------------------------------------------------------
    scan_s = statistics.median(E["mp_nii"].extra["scan_s"] + E["mp_gz"].extra["scan_s"])
    scan_best = min(E["mp_nii"].extra["scan_s"] + E["mp_gz"].extra["scan_s"])
    fps = n_export / scan_s
    single_array_mb = single.array_bytes / MB
    largest_export_mb = largest_export.array_bytes / MB
    mem_rows = []
    for label, meas, largest in (
        ("single series", S["mp_nii"], single_array_mb), ("single series .gz", S["mp_gz"], single_array_mb),
        ("export", E["mp_nii"], largest_export_mb), ("export .gz", E["mp_gz"], largest_export_mb),
    ):
        budget = base_mb + MEM_ARRAY_FACTOR * largest + MEM_FIXED_ALLOWANCE_MB
        # all processes together: the main process and each worker may hold one series at a time
        tree_budget = (workers + 1) * (base_mb + MEM_ARRAY_FACTOR * largest) + MEM_FIXED_ALLOWANCE_MB
        mem_rows.append({
            "run": label, "largest_series_array_mb": largest, "maxrss_mb": meas.maxrss_mb,
            "tree_pss_mb": meas.tree_pss_mb, "tree_rss_mb": meas.tree_rss_mb,
            "over_baseline_mb": meas.maxrss_mb - base_mb,
            "over_baseline_in_largest_arrays": (meas.maxrss_mb - base_mb) / largest, "budget_mb": budget,
            "tree_budget_mb": tree_budget,
            "ok": meas.maxrss_mb <= budget and meas.tree_pss_mb <= tree_budget,
        })

    targets = [
        {
            "target": f"single series .nii at most {TARGET_NII_RATIO:g}x dcm2niix -z n",
            "value": f"{S['mp_nii'].median:.2f} s vs {S['d_n'].median:.2f} s = {_ratio(S['mp_nii'].median, S['d_n'].median)} time"
                     f" (wall incl. interpreter start-up and imports: {_ratio(S['mp_nii'].wall, S['d_n'].wall)})",
            "ok": S["mp_nii"].median <= TARGET_NII_RATIO * S["d_n"].median,
        },
        {
            "target": "single series .nii.gz no slower than dcm2niix -z y",
            "value": f"{S['mp_gz'].median:.2f} s vs {S['d_y'].median:.2f} s = {_ratio(S['mp_gz'].median, S['d_y'].median)} time",
            "ok": S["mp_gz"].median <= S["d_y"].median,
        },
        {
            "target": f"header indexing >= {TARGET_FILES_PER_S:.0f} files/s on {ncpu} cores",
            "value": f"{fps:.0f} files/s ({n_export} files, scan {scan_s:.2f} s)",
            "ok": fps >= TARGET_FILES_PER_S,
        },
        {
            "target": "peak memory bounded by the largest series",
            "value": "; ".join(
                f"{r['run']} {r['maxrss_mb']:.0f}{'<=' if r['maxrss_mb'] <= r['budget_mb'] else '>'}{r['budget_mb']:.0f} MB"
                f" (tree {r['tree_pss_mb']:.0f}{'<=' if r['tree_pss_mb'] <= r['tree_budget_mb'] else '>'}{r['tree_budget_mb']:.0f})"
                for r in mem_rows),
            "ok": all(r["ok"] for r in mem_rows),
        },
    ]
    n_half = E["mp_half"].extra["last_report"]["n_files"]
    half_patients = {p.name for p in half_dir.iterdir() if p.is_dir()}
    largest_half = max(sp.array_bytes for sp in export_specs if sp.patient_id in half_patients)
    per_1000 = (E["mp_nii"].maxrss_mb - E["mp_half"].maxrss_mb) / max(n_export - n_half, 1) * 1000
    per_1000_tree = (E["mp_nii"].tree_pss_mb - E["mp_half"].tree_pss_mb) / max(n_export - n_half, 1) * 1000
    scaling = {
        "half_files": n_half, "full_files": n_export, "half_maxrss_mb": E["mp_half"].maxrss_mb,
        "full_maxrss_mb": E["mp_nii"].maxrss_mb, "half_tree_pss_mb": E["mp_half"].tree_pss_mb,
        "full_tree_pss_mb": E["mp_nii"].tree_pss_mb, "mb_per_1000_files": per_1000,
        "tree_mb_per_1000_files": per_1000_tree, "extrapolated_100k_files_mb": E["mp_nii"].maxrss_mb + per_1000 * (100_000 - n_export) / 1000,
        "half_largest_array_mb": largest_half / MB, "full_largest_array_mb": largest_export_mb,
    }
    correct = all(c.get("ok") for c in checks.values())
    bench_s = time.perf_counter() - t_start
    foreign_cores = max(0.0, (_cpu_busy_s() - busy0) - (_own_cpu_s() - own0)) / bench_s
    load_after = os.getloadavg()

    # -- print ---------------------------------------------------------------------------------
    lines: list[str] = []
    p = lines.append
    p("")
    p("=" * 100)
    p(f"medpipe ingest benchmark  (medpipe {medpipe.__version__}, {dcm2niix_version.strip()}, SimpleITK {SimpleITK.__version__}, "
      f"pydicom {pydicom.__version__}, nibabel {nibabel.__version__})")
    p(f"medpipe tree: {_git_state()}")
    p(f"machine load: load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; other processes used "
      f"{foreign_cores:.2f} of {ncpu} cores on average during the benchmark"
      + ("  ** WARNING: a busy machine; timings of parallel code suffer most **" if foreign_cores > 0.25 else ""))
    p(f"host: {platform.node()} {platform.machine()}, {ncpu} cores, python {platform.python_version()}; "
      f"medpipe workers={workers}; warm page cache; pigz: {pigz or 'not installed'}")
    p("times: medpipe = report.seconds['total'] (API, excludes interpreter start-up), SimpleITK = read+write in-process, "
      "dcm2niix = process wall; 'wall s' = whole child process incl. start-up. MB = 10^6 bytes.")
    p("=" * 100)
    p(f"\nA. Single series: {n_single} files, {args.slices} x 512x512 CT int16, {single_bytes / MB:.0f} MB DICOM, "
      f"array {single_array_mb:.0f} MB   (median of {args.repeat})")
    hdr = f"  {'tool':<36}{'median s':>9}{'best s':>8}{'wall s':>8}{'out MB':>8}{'peak RSS MB':>12}{'tree PSS MB':>12}"
    p(hdr)
    p("  " + "-" * (len(hdr) - 2))
    for key in ("mp_nii", "d_n", "sitk_nii", "mp_gz", "d_y", "d_i", "d_i1", "sitk_gz"):
        m = S[key]
        p(f"  {m.label:<36}{m.median:>9.2f}{m.best:>8.2f}{m.wall:>8.2f}{m.out_bytes / MB:>8.1f}{m.maxrss_mb:>12.0f}{m.tree_pss_mb:>12.0f}")
        if key == "sitk_nii":
            p("")
    mpn, mpg = S["mp_nii"], S["mp_gz"]
    p("  ratios (medpipe / peer; < 1 = medpipe faster):")
    for a, b, what in (
        (mpn, S["d_n"], "medpipe .nii    vs dcm2niix -z n     "), (mpn, S["sitk_nii"], "medpipe .nii    vs SimpleITK .nii    "),
        (mpg, S["d_y"], "medpipe .nii.gz vs dcm2niix -z y     "), (mpg, S["d_i"], "medpipe .nii.gz vs dcm2niix -z i     "),
        (mpg, S["d_i1"], "medpipe .nii.gz vs dcm2niix -z i -1  "), (mpg, S["sitk_gz"], "medpipe .nii.gz vs SimpleITK .nii.gz "),
    ):
        p(f"    {what}: {_ratio(a.median, b.median)} time (wall incl. start-up: {_ratio(a.wall, b.wall)}), "
          f"{_ratio(a.out_bytes, b.out_bytes)} output size, {_ratio(a.maxrss_mb, b.maxrss_mb)} peak RSS")
    p(f"  medpipe phases (median): .nii scan {statistics.median(mpn.extra['scan_s']):.2f} s + build {statistics.median(mpn.extra['build_s']):.2f} s; "
      f".nii.gz scan {statistics.median(mpg.extra['scan_s']):.2f} s + build {statistics.median(mpg.extra['build_s']):.2f} s; "
      f"import medpipe.ingest {statistics.median(mpn.extra['import_s']):.2f} s")
    d_lines = S["d_y"].extra.get("compressor_lines") or []
    p(f"  dcm2niix -z y compressor: {'pigz (' + pigz + ')' if pigz else 'pigz not found -> internal zlib (level 6)'}"
      + (f"; it printed: {d_lines[0]!r}" if d_lines else ""))
    p("  medpipe gzip: level 1, deflated in parallel chunks (medpipe.io.gzip_file); dcm2niix default level 6; "
      "-z i -1 is the same level")

    p(f"\nB. PACS export: {n_export} files, {export_bytes / MB:.0f} MB, {export_patients} patients / {export_studies} studies / "
      f"{export_series} series (128/256 matrix, 20-80 slices), largest array {largest_export_mb:.1f} MB, all arrays {export_pixels / MB:.0f} MB")
    hdr = f"  {'tool':<42}{'seconds':>9}{'wall s':>8}{'files/s':>9}{'out MB':>8}{'peak RSS MB':>12}{'tree PSS MB':>12}"
    p(hdr)
    p("  " + "-" * (len(hdr) - 2))
    for key in ("mp_nii", "mp_gz"):
        m = E[key]
        sc = statistics.median(m.extra["scan_s"])
        p(f"  {m.label + ' [scan phase]':<42}{sc:>9.2f}{'':>8}{n_export / sc:>9.0f}{'':>8}{'':>12}{'':>12}")
        p(f"  {m.label + ' [total]':<42}{m.median:>9.2f}{m.wall:>8.2f}{n_export / m.median:>9.0f}{m.out_bytes / MB:>8.0f}{m.maxrss_mb:>12.0f}{m.tree_pss_mb:>12.0f}")
    for key in ("mp_half", "d_n", "pyd1", "pydN"):
        m = E[key]
        p(f"  {m.label:<42}{m.median:>9.2f}{m.wall:>8.2f}{n_export / m.median:>9.0f}{m.out_bytes / MB:>8.0f}{m.maxrss_mb:>12.0f}{m.tree_pss_mb:>12.0f}")
    p("  ratios (medpipe / peer):")
    p(f"    medpipe scan phase   vs pydicom header loop (1 proc)      : {_ratio(scan_s, E['pyd1'].median)} time")
    p(f"    medpipe scan phase   vs pydicom header loop ({workers} procs)     : {_ratio(scan_s, E['pydN'].median)} time")
    p(f"    medpipe .nii total   vs dcm2niix -z n (full conversion)   : {_ratio(E['mp_nii'].median, E['d_n'].median)} time "
      f"(wall incl. start-up: {_ratio(E['mp_nii'].wall, E['d_n'].wall)})")
    p(f"    medpipe .nii.gz total vs dcm2niix -z n                    : {_ratio(E['mp_gz'].median, E['d_n'].median)} time")

    p(f"\nC. Peak memory of medpipe (baseline process with its imports: {base_mb:.0f} MB)")
    p(f"  budget per process = baseline + {MEM_ARRAY_FACTOR:g} x largest array + {MEM_FIXED_ALLOWANCE_MB:.0f} MB; "
      f"tree budget = (workers + 1) x (baseline + {MEM_ARRAY_FACTOR:g} x largest array) + {MEM_FIXED_ALLOWANCE_MB:.0f} MB")
    p(f"  {'run':<18}{'largest array':>14}{'peak RSS':>10}{'over base':>10}{'= x largest':>12}{'budget':>8}"
      f"{'tree PSS':>10}{'tree RSS':>10}{'tree budget':>12}   (MB)")
    for r in mem_rows:
        p(f"  {r['run']:<18}{r['largest_series_array_mb']:>14.1f}{r['maxrss_mb']:>10.0f}{r['over_baseline_mb']:>10.0f}"
          f"{r['over_baseline_in_largest_arrays']:>12.1f}{r['budget_mb']:>8.0f}{r['tree_pss_mb']:>10.0f}{r['tree_rss_mb']:>10.0f}"
          f"{r['tree_budget_mb']:>12.0f}")
    p(f"  growth with the number of files (same ingest on {n_half} vs {n_export} files): "
      f"{per_1000:+.1f} MB peak RSS and {per_1000_tree:+.1f} MB tree PSS per 1,000 files "
      f"(largest array {largest_half / MB:.1f} vs {largest_export_mb:.1f} MB) "
      + (f"(=> ~{scaling['extrapolated_100k_files_mb']:.0f} MB peak RSS at 100,000 files)" if n_export - n_half >= 1000
         else "(too few files to extrapolate)"))
    p(f"  (peak RSS = largest single process, GNU time %M; tree = sampled sum over all processes "
      f"every 50 ms; export pixel data in total: {export_pixels / MB:.0f} MB)")

    p("\nD. Correctness")
    for name, c in checks.items():
        detail = {k: v for k, v in c.items() if k in ("max_abs_diff", "n_mismatch", "common_voxels", "a_shape", "b_shape",
                                                       "b_axes_for_a", "why", "status", "n_rejected", "n_volumes",
                                                       "expected_volumes", "n_outputs", "expected", "reasons", "rejected_sample", "shape")}
        p(f"  [{'OK ' if c.get('ok') else 'BAD'}] {name}: {json.dumps(detail)}")

    p("\nE. Targets")
    for t in targets:
        p(f"  [{'PASS' if t['ok'] else 'MISS'}] {t['target']}: {t['value']}")
    p(f"  [INFO] memory that grows with the number of files (headers / catalog rows in the main process): "
      f"{per_1000:+.1f} MB per 1,000 files"
      + (f", ~{scaling['extrapolated_100k_files_mb']:.0f} MB at 100,000 files" if n_export - n_half >= 1000 else ""))
    p(f"  correctness: {'all checks OK' if correct else 'PROBLEMS, see D'}")
    p(f"\nbenchmark wall time {bench_s:.0f} s; results: {args.json}")
    print("\n".join(lines))

    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": {"node": platform.node(), "machine": platform.machine(), "cpus": ncpu, "python": platform.python_version()},
        "versions": {"medpipe": medpipe.__version__, "dcm2niix": dcm2niix_version.strip(), "SimpleITK": SimpleITK.__version__,
                     "pydicom": pydicom.__version__, "nibabel": nibabel.__version__, "pigz": pigz},
        "params": {"slices": args.slices, "export_files": args.export_files, "repeat": args.repeat,
                   "export_repeat": args.export_repeat, "workers": workers, "workdir": str(work)},
        "inputs": {"single_files": n_single, "single_mb": single_bytes / MB, "single_array_mb": single_array_mb,
                   "export_files": n_export, "export_mb": export_bytes / MB, "export_series": export_series,
                   "export_patients": export_patients, "export_studies": export_studies,
                   "export_largest_array_mb": largest_export_mb, "export_arrays_mb": export_pixels / MB},
        "baseline_rss_mb": base_mb, "medpipe_tree": _git_state(),
        "load": {"loadavg_before": load_before, "loadavg_after": load_after, "foreign_cores_avg": foreign_cores},
        "single": {k: m.as_dict() for k, m in S.items()},
        "export": {k: m.as_dict() for k, m in E.items()},
        "scan_files_per_s": fps, "scan_s_median": scan_s, "scan_s_best": scan_best,
        "memory": mem_rows, "memory_scaling": scaling, "checks": checks, "targets": targets, "correct": correct, "report": "\n".join(lines),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.parent == RESULTS.parent and not (RESULTS.parent / ".gitignore").exists():
        (RESULTS.parent / ".gitignore").write_text("# benchmark output, written by benchmarks/*.py\n*\n")
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.profile:
        print("Profiling medpipe (cProfile, workers=1) ...")
        profile_medpipe(single_dir, out_root / "profile", False, args.json.parent / "ingest_profile_single.txt")
        profile_medpipe(export_dir, out_root / "profile", False, args.json.parent / "ingest_profile_export.txt")
    if not args.keep:
        shutil.rmtree(out_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
