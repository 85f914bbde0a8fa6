#!/usr/bin/env python
"""Pull 1,000 instances from a local Orthanc by C-MOVE, C-GET and WADO-RS: medpipe vs dcmtk's movescu / getscu.

    sudo python benchmarks/pacs.py [--instances 1000] [--series 10] [--matrix 256] [--repeat 3]
                                   [--workdir DIR] [--json PATH] [--profile]

1. Generates one CT study (``--series`` series of ``--matrix``² int16 slices, Explicit VR Little
   Endian, ``--instances`` files in all; cached in the work dir) with the test suite's DICOM factory.
2. Moves this process into a private network namespace with only loopback (root needed: Orthanc
   listens on every interface), starts Orthanc (Debian ``orthanc``, ``orthanc-dicomweb``) with a
   temporary configuration, and uploads the study through its REST API.
3. Pulls the whole study ``--repeat`` times per tool, interleaved, each into a fresh folder:

   * ``medpipe pacs pull --via move|get|wado`` in a child Python process (the library's own timer:
     listing the instances by C-FIND / QIDO-RS included; the process wall time also shown), C-MOVE
     and C-GET once with ``engine: pynetdicom`` and once with ``engine: dcmtk`` (medpipe's planning,
     dcmtk's movescu / getscu moving the bytes, files placed into medpipe's layout);
   * ``movescu -S ... -k QueryRetrieveLevel=STUDY`` (the C-MOVE destination is movescu's own
     storage SCP) and ``getscu -S ...`` from dcmtk, process wall time (no listing: dcmtk moves the
     study blind).

4. Checks every run received every instance, and that medpipe's files hold the uploaded data sets
   byte for byte. Prints instances/s and MB/s (median of the repeats), the CPU time (user + system)
   each tool's process used per instance (medpipe's includes Python start-up and imports, about
   0.3 s), and PASS / MISS against the aim (medpipe at least dcmtk's throughput, C-MOVE vs movescu
   and C-GET vs getscu, each engine). The dcmtk tools are found by asking each ``movescu`` /
   ``getscu`` on PATH (then /usr/bin) for its version (:func:`medpipe.pacs.dcmtk.find_tool`):
   pynetdicom installs Python apps of the same names.

Results also go to ``benchmarks/results/pacs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "pacs.json"
GEN_VERSION = 1
sys.path.insert(0, str(REPO))  # the test suite's DICOM factory and Orthanc runner

#: DCMTK (inside Orthanc, and movescu / getscu) leaves Nagle's algorithm on unless TCP_NODELAY is set: every
#: small PDU then waits for a delayed ACK (~40 ms), and both tools crawl at ~20 instances/s. Set for both
#: (medpipe's dcmtk engine sets it for the tools it runs).
from medpipe.pacs.dcmtk import NODELAY

CHILD = r"""
import json, sys
from medpipe.pacs.nodes import load_nodes
from medpipe.pacs.pull import pull
from medpipe.pacs.query import StudyQuery
node = load_nodes(sys.argv[1]).get(sys.argv[5])
r = pull(node, StudyQuery(study_uids=(sys.argv[2],)), sys.argv[3], methods=(sys.argv[4],))
print(json.dumps({"seconds": r.seconds, "received": r.received, "expected": r.expected, "bytes": r.bytes}))
"""


def make_inputs(folder: Path, instances: int, series: int, matrix: int) -> tuple[Path, str]:
    """One CT study of ``instances`` files (cached: a marker records the parameters)."""
    marker = folder / ".inputs.json"
    params = {"instances": instances, "series": series, "matrix": matrix, "version": GEN_VERSION}
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        return folder / "study", json.loads(marker.read_text())["study_uid"]
    import numpy as np

    from tests.dicom_factory import Geometry, write_series

    shutil.rmtree(folder / "study", ignore_errors=True)
    per = [instances // series + (1 if i < instances % series else 0) for i in range(series)]
    rng = np.random.default_rng(0)
    study_uid = ""
    for i, n in enumerate(per):
        base = rng.integers(0, 1200, size=(matrix, matrix, 1), dtype=np.int16)
        stored = (base + rng.integers(-40, 40, size=(matrix, matrix, n), dtype=np.int16)).astype(np.int16)
        w = write_series(folder / "study" / f"s{i:02d}", stored, Geometry(pixel_spacing=(0.7, 0.7), slice_spacing=1.0),
                         modality="CT", patient_id="BENCH01", study_uid=None if i == 0 else study_uid,
                         series_number=i + 1, tag=f"bench{i}", seed=i, intercepts=-1024.0)
        study_uid = w.study_uid
    marker.write_text(json.dumps({"params": params, "study_uid": study_uid}))
    return folder / "study", study_uid


def _dataset_bytes(data: bytes) -> bytes:
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(data)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return data[fh.tell():]


def check_same(pulled: Path, originals: dict[str, bytes]) -> int:
    """How many pulled files differ from the upload (data set bytes; SOP Instance UID from the file name)."""
    bad = 0
    for p in pulled.rglob("*.dcm"):
        if _dataset_bytes(p.read_bytes()) != originals.get(p.stem):
            bad += 1
    return bad


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_medpipe(nodes: Path, study: str, out: Path, method: str, node: str = "orthanc") -> dict[str, Any]:
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(nodes), study, str(out), method, node],
                          capture_output=True, text=True, check=False, cwd=REPO)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"medpipe {method} failed: {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": got["seconds"]["total"], "wall": wall, "cpu": cpu, "files": got["received"],
            "transfer": got["seconds"]["transfer"], "list": got["seconds"]["list"]}


def run_dcmtk(tool: str, aet: str, port_args: list[str], orthanc: Any, study: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [tool, "-S", "-aet", aet, "-aec", orthanc.aet, *port_args, "-od", str(out),
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(orthanc.dicom_port)]
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **NODELAY})
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    files = sum(1 for p in out.rglob("*") if p.is_file())
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"seconds": wall, "wall": wall, "cpu": cpu, "files": files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medpipe-bench-pacs")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--profile", action="store_true", help="also cProfile one medpipe C-MOVE pull in this process")
    args = ap.parse_args()

    from medpipe.pacs.dcmtk import find_tool
    from tests.orthanc_server import LOOPBACK, Orthanc, PrivateNetwork, free_port, why_no_orthanc

    problem = why_no_orthanc()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    tools = {}
    for tool in ("movescu", "getscu"):
        found = find_tool(tool)
        if isinstance(found, str):
            print(f"cannot run: {found}", file=sys.stderr)
            return 2
        tools[tool] = found
    print(f"dcmtk: {tools['movescu'][0]}, {tools['getscu'][0]} ({tools['getscu'][1]})")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src, study = make_inputs(work / "inputs", args.instances, args.series, args.matrix)
    files = sorted(src.rglob("*.dcm"))
    import pydicom

    originals = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): _dataset_bytes(f.read_bytes())
                 for f in files}
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"inputs: {len(files)} instances, {total_mb:.0f} MB, {args.series} series of {args.matrix}x{args.matrix} "
          f"({time.perf_counter() - t0:.1f} s)")

    results: dict[str, list[dict[str, Any]]] = {}
    with PrivateNetwork():
        ports = {"MEDPIPE": free_port(), "MOVESCU": free_port(), "GETSCU": free_port()}
        shutil.rmtree(work / "orthanc", ignore_errors=True)
        orthanc = Orthanc(work / "orthanc", modalities={k.lower(): (k, p) for k, p in ports.items()},
                          env=NODELAY).start()
        try:
            t1 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda f: orthanc.upload([f]), files))
            print(f"uploaded to Orthanc {orthanc_version(orthanc)} in {time.perf_counter() - t1:.1f} s")
            nodes = work / "pacs.yaml"
            node = {"ae_title": orthanc.aet, "host": LOOPBACK, "port": orthanc.dicom_port, "our_ae_title": "MEDPIPE",
                    "our_port": ports["MEDPIPE"], "dicomweb": orthanc.dicomweb_url, "retries": 0}
            nodes.write_text(json.dumps({"nodes": {
                "orthanc": {**node, "bind": LOOPBACK, "engine": "pynetdicom"},
                "orthanc-dcmtk": {**node, "engine": "dcmtk"},  # movescu listens on every interface: loopback here
            }}))
            runs = {
                "medpipe C-MOVE": lambda out: run_medpipe(nodes, study, out, "move"),
                "medpipe C-MOVE dcmtk": lambda out: run_medpipe(nodes, study, out, "move", "orthanc-dcmtk"),
                "movescu (dcmtk)": lambda out: run_dcmtk(tools["movescu"][0], "MOVESCU", ["-aem", "MOVESCU", "--port",
                                                                                  str(ports["MOVESCU"])],
                                                         orthanc, study, out),
                "medpipe C-GET": lambda out: run_medpipe(nodes, study, out, "get"),
                "medpipe C-GET dcmtk": lambda out: run_medpipe(nodes, study, out, "get", "orthanc-dcmtk"),
                "getscu (dcmtk)": lambda out: run_dcmtk(tools["getscu"][0], "GETSCU", [], orthanc, study, out),
                "medpipe WADO-RS": lambda out: run_medpipe(nodes, study, out, "wado"),
            }
            for rep in range(args.repeat):
                for name, fn in runs.items():
                    out = work / "out" / "-".join(name.replace("(", "").replace(")", "").split())
                    shutil.rmtree(out, ignore_errors=True)
                    r = fn(out)
                    if r["files"] != len(files):
                        raise RuntimeError(f"{name}: {r['files']} of {len(files)} instances arrived")
                    if name.startswith("medpipe") and rep == 0:
                        r["differ"] = check_same(out, originals)
                        if r["differ"]:
                            raise RuntimeError(f"{name}: {r['differ']} files differ from the upload")
                    results.setdefault(name, []).append(r)
                    print(f"  run {rep + 1}: {name:<20} {r['seconds']:6.2f} s ({len(files) / r['seconds']:6.0f} "
                          f"instances/s)", flush=True)
            if args.profile:
                profile_move(nodes, study, work / "out" / "profile")
        finally:
            orthanc.stop()

    table = summarise(results, len(files), total_mb)
    print()
    print(f"{'tool':<20} {'median s':>9} {'inst/s':>8} {'MB/s':>7} {'wall s':>7} {'CPU ms/inst':>11}  note")
    for row in table:
        print(f"{row['tool']:<20} {row['seconds']:9.2f} {row['instances_per_s']:8.0f} {row['mb_per_s']:7.1f} "
              f"{row['wall']:7.2f} {row['cpu_ms_per_instance']:11.2f}  {row['note']}")
    by = {r["tool"]: r for r in table}
    verdicts = []
    for ours, theirs in (("medpipe C-MOVE", "movescu (dcmtk)"), ("medpipe C-MOVE dcmtk", "movescu (dcmtk)"),
                         ("medpipe C-GET", "getscu (dcmtk)"), ("medpipe C-GET dcmtk", "getscu (dcmtk)")):
        ratio = by[ours]["instances_per_s"] / by[theirs]["instances_per_s"]
        ok = ratio >= 1.0
        verdicts.append({"ours": ours, "theirs": theirs, "ratio": round(ratio, 3), "pass": ok})
        print(f"{'PASS' if ok else 'MISS'}: {ours} at {ratio:.2f}x the throughput of {theirs} (aim: >= 1.0x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"instances": len(files), "mb": round(total_mb, 1), "series": args.series,
                                     "matrix": args.matrix, "repeat": args.repeat, "cpus": os.cpu_count(),
                                     "table": table, "verdicts": verdicts, "runs": results}, indent=1))
    print(f"results in {args.json}")
    return 0


def orthanc_version(o: Any) -> str:
    try:
        return str(o.rest("GET", "/system")["Version"])
    except Exception:  # pragma: no cover - informative only
        return "?"


def summarise(results: dict[str, list[dict[str, Any]]], n: int, mb: float) -> list[dict[str, Any]]:
    out = []
    for name, runs in results.items():
        secs = statistics.median(r["seconds"] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        note = "listing included; wall = process incl. Python start-up" if name.startswith("medpipe") else \
            "process wall time (no listing)"
        out.append({"tool": name, "seconds": round(secs, 3), "instances_per_s": round(n / secs, 1),
                    "mb_per_s": round(mb / secs, 2), "wall": round(wall, 3), "cpu_s": round(cpu, 3),
                    "cpu_ms_per_instance": round(1000 * cpu / n, 3), "note": note})
    return out


def profile_move(nodes: Path, study: str, out: Path) -> None:
    import cProfile
    import pstats

    from medpipe.pacs.nodes import load_nodes
    from medpipe.pacs.pull import pull
    from medpipe.pacs.query import StudyQuery

    shutil.rmtree(out, ignore_errors=True)
    node = load_nodes(nodes).get("orthanc")
    prof = cProfile.Profile()
    prof.enable()
    pull(node, StudyQuery(study_uids=(study,)), out, methods=("move",))
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
