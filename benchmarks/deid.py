"""medpipe deid vs the `deid` package (and optionally dicognito, dicom-anonymizer) on a 5,000-file export.

The export (generated once, cached under ``benchmarks/work/deid/``): the synthetic brain-tumour sample
(``--cases`` studies x 4 MR series x 32 slices + a DICOM SEG each) with fictitious PHI planted in every
file (names, IDs, dates, addresses, institution, station, serial number, free text, nested sequences,
private tags; a different patient per case), plus every file of the ``deid-data`` package (real vendor
headers with fictitious PHI; US and secondary captures). About 5,050 files for the default 39 cases.

Measured, each tool on the same files, writing a copy of the export:

* files per second (wall clock, reading + de-identifying + writing): medpipe with ``--workers`` processes
  and with one, `deid`'s ``replace_identifiers`` with its default recipe (one process; it has no parallel
  mode), each in a fresh process;
* PHI values left behind: for every output file, the source's identifying values
  (:func:`medpipe.deid.audit.identifying_values`: names, dates, IDs, addresses, institutions, devices,
  free text, private text) found in its bytes (:func:`medpipe.deid.audit.leaks`); original instance UIDs
  are counted apart;
* validity: objects left without SOP Instance / Study / Series Instance UID, Media Storage SOP Instance UID
  different from SOP Instance UID, SEGs whose referenced instances are not in the tool's output, pixel data
  changed.

medpipe runs with ``--allow-burned-in`` here, so that both tools write the same files (its default would
quarantine deid-data's ultrasound and secondary-capture images; `deid` has no such check).

    python benchmarks/deid.py                       # full run (~5,050 files)
    python benchmarks/deid.py --cases 3             # smoke test (~400 files)
    python benchmarks/deid.py --tools medpipe,deid,dicognito,dicom-anonymizer --cases 3   # needs those installed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this script is named deid.py: its folder must not shadow the `deid` package it compares against
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

GEN_VERSION = 1


def build_export(work: Path, cases: int) -> Path:
    """The benchmark export (cached; rebuilt when the parameters change)."""
    import pydicom

    from medpipe.sample import generate_brain_tumor
    from tests.deid_helpers import deid_data_folder, fictitious_patient, plant_phi

    export = work / f"export_{cases}"
    marker = work / f".export_{cases}.json"
    params = {"cases": cases, "version": GEN_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return export
    shutil.rmtree(export, ignore_errors=True)
    gen = work / f"generated_{cases}"
    generate_brain_tumor(gen, cases=cases, seed=0)
    shutil.copytree(gen / "dicom", export / "sample")
    for i, case_dir in enumerate(sorted((export / "sample").iterdir())):
        patient = fictitious_patient(i)
        for f in sorted(case_dir.rglob("*.dcm")):
            ds = pydicom.dcmread(f)
            plant_phi(ds, patient)
            ds.save_as(f, enforce_file_format=True)
    shutil.copytree(deid_data_folder(), export / "deid-data", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(gen)
    marker.write_text(json.dumps(params))
    return export


# -- the tools (each run in a child process: python benchmarks/deid.py --run TOOL SRC OUT) --------------


def run_medpipe(src: Path, out: Path, workers: int) -> None:
    from medpipe.deid.run import DeidSettings, deidentify

    deidentify(src, out, DeidSettings(key=out.parent / f"{out.name}.key", allow_burned_in=True), workers=workers)


def _per_dataset(src: Path, out: Path, fn: Any) -> None:
    """Apply ``fn(ds) -> ds`` to every DICOM file of ``src``; write each result under ``out`` (same path)."""
    import pydicom

    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        ds = fn(ds, path)
        if ds is None:
            continue
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=False)


def run_deid(src: Path, out: Path) -> None:
    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers
    from deid.logger import bot

    bot.level = 0  # its progress messages would dominate the time
    recipe = DeidRecipe()  # the default recipe (deid.dicom), as the issue describes

    import pydicom

    files = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            pydicom.dcmread(path, stop_before_pixels=True)  # deid's own reader would stop at non-DICOM files
        except Exception:  # noqa: BLE001
            continue
        files.append(path)
    for i in range(0, len(files), 64):  # lists, as replace_identifiers takes them
        chunk = files[i : i + 64]
        for path, ds in zip(chunk, replace_identifiers([str(p) for p in chunk], deid=recipe, save=False), strict=True):
            target = out / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=False)


def run_dicognito(src: Path, out: Path) -> None:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="medpipe-benchmark")

    def fn(ds: Any, path: Path) -> Any:
        anonymizer.anonymize(ds)
        return ds

    _per_dataset(src, out, fn)


def run_dicom_anonymizer(src: Path, out: Path) -> None:
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset

    def fn(ds: Any, path: Path) -> Any:
        anonymize_dataset(ds, delete_private_tags=True)
        return ds

    _per_dataset(src, out, fn)


def _child(tool: str, src: Path, out: Path, workers: int) -> None:
    warnings.simplefilter("ignore")
    if tool.startswith("medpipe"):
        run_medpipe(src, out, workers)
    else:
        {"deid": run_deid, "dicognito": run_dicognito, "dicom-anonymizer": run_dicom_anonymizer}[tool](src, out)


def timed(tool: str, src: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    for p in out.parent.glob(f"{out.name}.key*"):
        p.unlink()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--run", tool, str(src), str(out), "--workers", str(workers)],
                   check=True)
    return time.perf_counter() - t0


# -- quality ---------------------------------------------------------------------------------------------


def quality(tool: str, src: Path, out: Path, sources: dict[str, tuple[Path, Any]],
            by_path: dict[str, tuple[Path, Any]]) -> dict[str, Any]:
    """PHI left and validity of one tool's output (matched to sources by path, or by medpipe's map)."""
    import pydicom

    from medpipe.deid.audit import identifying_values, leaks

    uid_map: dict[str, str] = {}
    if tool.startswith("medpipe"):
        uid_map = json.loads((out.parent / f"{out.name}.key.map.json").read_text())["uids"]
    outputs = sorted(p for p in out.rglob("*.dcm")) if tool.startswith("medpipe") else sorted(
        p for p in out.rglob("*") if p.is_file())
    stats = {"files": 0, "phi_left": 0, "files_with_phi": 0, "original_uids_left": 0, "missing_uids": 0,
             "media_storage_mismatch": 0, "pixels_changed": 0, "segs": 0, "segs_resolving": 0, "examples": {}}
    out_sops: set[str] = set()
    segs = []
    for p in outputs:
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001
            continue
        if tool.startswith("medpipe"):
            _, src_ds = sources[uid_map[str(ds.SOPInstanceUID)]]
        else:
            _, src_ds = by_path[str(src / p.relative_to(out))]
        stats["files"] += 1
        values = identifying_values(src_ds)
        uids = {v for v in values if v[:1].isdigit() and "." in v and v.replace(".", "").isdigit()}
        found = leaks(p, values)
        phi = [v for v in found if v not in uids]
        stats["phi_left"] += len(phi)
        stats["files_with_phi"] += bool(phi)
        stats["original_uids_left"] += len(found) - len(phi)
        for v in phi[:3]:
            stats["examples"].setdefault(v, 0)
            stats["examples"][v] += 1
        if not all(ds.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
            stats["missing_uids"] += 1
        meta = getattr(ds, "file_meta", None)
        if meta is None or meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
            stats["media_storage_mismatch"] += 1
        if "PixelData" in src_ds and ds.get("PixelData") != src_ds.PixelData:
            stats["pixels_changed"] += 1
        if ds.get("SOPInstanceUID"):
            out_sops.add(str(ds.SOPInstanceUID))
        if ds.get("Modality") == "SEG":
            segs.append(ds)
    for seg in segs:
        refs = [str(i.get("ReferencedSOPInstanceUID", "")) for s in seg.get("ReferencedSeriesSequence", [])
                for i in s.get("ReferencedInstanceSequence", [])]
        stats["segs"] += 1
        stats["segs_resolving"] += bool(refs) and all(r in out_sops for r in refs)
    stats["examples"] = dict(sorted(stats["examples"].items(), key=lambda kv: -kv[1])[:8])
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=39, help="sample studies (39: ~5,050 files with deid-data)")
    ap.add_argument("--workers", type=int, default=2, help="medpipe worker processes (default 2: this machine)")
    ap.add_argument("--tools", default="medpipe,deid", help="comma list: medpipe, deid, dicognito, dicom-anonymizer")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "work" / "deid")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--run", nargs=3, metavar=("TOOL", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:  # child process
        _child(args.run[0], Path(args.run[1]), Path(args.run[2]), args.workers)
        return
    import pydicom

    warnings.simplefilter("ignore")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export = build_export(args.workdir, args.cases)
    n_files = sum(1 for p in export.rglob("*") if p.is_file())
    print(f"export: {export} ({n_files} files; built/checked in {time.perf_counter() - t0:.0f} s)", flush=True)
    sources: dict[str, tuple[Path, Any]] = {}
    by_path: dict[str, tuple[Path, Any]] = {}
    for p in sorted(export.rglob("*")):
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001
            continue
        sources.setdefault(str(ds.SOPInstanceUID), (p, ds))
        by_path[str(p)] = (p, ds)
    runs = []
    for tool in args.tools.split(","):
        variants = [(f"medpipe (workers={args.workers})", args.workers), ("medpipe (workers=1)", 1)] \
            if tool == "medpipe" else [(tool, 1)]
        for label, workers in variants:
            out = args.workdir / "out" / label.split(" ")[0].replace("/", "_") / f"w{workers}"
            seconds = timed(tool if tool != "medpipe" else "medpipe", export, out, workers)
            q = quality(tool, export, out, sources, by_path)
            runs.append({"tool": label, "seconds": round(seconds, 2), "files_per_s": round(n_files / seconds, 1), **q})
            print(json.dumps(runs[-1]), flush=True)
    print()
    print(f"{n_files} files ({len(sources)} DICOM instances); 2-core machine; wall clock incl. start-up")
    head = f"{'tool':28s} {'files/s':>8s} {'s':>7s} {'written':>8s} {'PHI left':>9s} {'orig UIDs':>9s} " \
           f"{'no UIDs':>8s} {'meta≠SOP':>8s} {'SEG refs ok':>11s} {'pixels≠':>7s}"
    print(head)
    for r in runs:
        print(f"{r['tool']:28s} {r['files_per_s']:8.1f} {r['seconds']:7.1f} {r['files']:8d} {r['phi_left']:9d} "
              f"{r['original_uids_left']:9d} {r['missing_uids']:8d} {r['media_storage_mismatch']:8d} "
              f"{str(r['segs_resolving']) + '/' + str(r['segs']):>11s} {r['pixels_changed']:7d}")
    base = next((r for r in runs if r["tool"] == "deid"), None)
    if base:
        for r in runs:
            if r["tool"].startswith("medpipe"):
                print(f"{r['tool']}: {r['files_per_s'] / base['files_per_s']:.1f}x deid's throughput")
    if args.json:
        args.json.write_text(json.dumps({"files": n_files, "runs": runs}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
