#!/usr/bin/env python
"""``medpipe score`` on a 40-study export: one process vs one process per study, time split, memory.

    python benchmarks/score.py [--cases 40] [--model MODEL_DIR] [--workdir DIR] [--cpu-threads 1]
                               [--no-separate] [--json PATH]

1. Generates a synthetic brain MR export (``medpipe sample brain-tumor``, 4 series per study, cached).
2. Needs a trained segmenter package: ``--model``, else ``runs/brain_tumor/latest/stages/03_train_segmenter/model``
   (``medpipe run pipelines/brain_tumor.yaml``), else trains one into the work dir (about 1.5 min).
3. **One process** scores the whole export (ingest included): studies per minute, and the time split
   into ingest, read, preprocess, inference and write. read / preprocess / infer / write are summed
   over studies in the threads that ran them; the scoring wall time being clearly below their sum is
   the proof that they overlap.
4. **One process per study** (the pattern users suffer from: a fresh ``medpipe score`` per case,
   model and libraries loaded 40 times), run one after another: total wall time and the ratio.
5. **Memory**: the single-process run's peak RSS for 10, 20 and 40 studies (children measured with
   ``wait4``): flat in the number of studies means the queues are bounded.
6. **Accuracy** of the scored volumes against the sample's ground-truth volumes (``labels.csv``).

Results also go to ``benchmarks/results/score.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "score.json"


def _popen_peak(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the child in MB, stdout); the child is reaped with ``wait4`` for its RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, int(usage.ru_maxrss / 1024), out


def child(args: argparse.Namespace) -> None:
    """Score ``--src`` in this process and print the report's numbers as JSON (used by the parent)."""
    from medpipe.scoring.engine import ScoreOptions, score

    report = score(args.src, args.model, args.out, ScoreOptions(cpu_threads=args.cpu_threads, readers=args.readers,
                                                                 writers=args.writers))
    print(json.dumps({"seconds": report.seconds, "counts": report.counts, "n": len(report.rows)}))


def ensure_model(work: Path, model: str | None) -> Path:
    if model:
        return Path(model).resolve()
    default = REPO / "runs" / "brain_tumor" / "latest" / "stages" / "03_train_segmenter" / "model"
    if (default / "model.json").is_file():
        return default
    trained = work / "train" / "stages" / "03_train_segmenter" / "model"
    if not (trained / "model.json").is_file():
        print("training the brain_tumor model first (medpipe run pipelines/brain_tumor.yaml) ...", flush=True)
        shutil.rmtree(work / "train", ignore_errors=True)
        subprocess.run([sys.executable, "-m", "medpipe.cli", "run", "pipelines/brain_tumor.yaml", "--out",
                        str(work / "train")], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return trained


def ensure_export(work: Path, cases: int) -> Path:
    export = work / f"export_{cases}"
    if not (export / "labels.csv").is_file():
        subprocess.run([sys.executable, "-m", "medpipe.cli", "sample", "brain-tumor", str(export), "--cases",
                        str(cases), "--seed", "2024"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return export


def subset(export: Path, work: Path, n: int) -> Path:
    """A folder with the first ``n`` studies of the export (hard links: no copies; ingest does not follow
    symbolic links to folders)."""
    folder = work / f"subset_{n}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for p in sorted((export / "dicom").iterdir())[:n]:
        shutil.copytree(p, folder / p.name, copy_function=os.link)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workdir", default=str(HERE / "work" / "score"))
    ap.add_argument("--cpu-threads", type=int, default=1)
    ap.add_argument("--readers", type=int, default=1)
    ap.add_argument("--writers", type=int, default=1)
    ap.add_argument("--no-separate", action="store_true", help="skip the one-process-per-study runs")
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = ensure_model(work, args.model)
    export = ensure_export(work, args.cases)
    me = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model),
          "--cpu-threads", str(args.cpu_threads), "--readers", str(args.readers), "--writers", str(args.writers)]
    results: dict[str, Any] = {"cases": args.cases, "model": str(model), "cpu_count": os.cpu_count(),
                               "cpu_threads": args.cpu_threads}

    # 1. one process, the whole export (ingest included), and its memory for 10 / 20 / N studies
    peaks = {}
    for n in sorted({min(10, args.cases), min(20, args.cases), args.cases}):
        src = subset(export, work, n)
        out = work / f"one_{n}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, text = _popen_peak([*me, "--src", str(src), "--out", str(out)])
        peaks[n] = rss
        if n == args.cases:
            doc = json.loads(text.strip().splitlines()[-1])
            results["one_process"] = {"wall": wall, "peak_rss_mb": rss, **doc}
    results["peak_rss_mb_by_studies"] = peaks
    one = results["one_process"]
    s = one["seconds"]
    busy = sum(s.get(k, 0.0) for k in ("read", "preprocess", "infer", "write"))
    print(f"one process, {args.cases} studies: wall {one['wall']:.1f} s (ingest {s['ingest']:.1f} s, model load "
          f"{s.get('load_model', 0):.1f} s, scoring {s['scoring']:.1f} s) -> "
          f"{60 * args.cases / one['wall']:.1f} studies/min ({60 * args.cases / s['scoring']:.1f} after ingest); "
          f"{one['counts']}")
    print(f"  time split (summed over studies): read {s.get('read', 0):.1f} s, preprocess {s.get('preprocess', 0):.1f} s, "
          f"inference {s.get('infer', 0):.1f} s, write {s.get('write', 0):.1f} s = {busy:.1f} s; scoring wall "
          f"{s['scoring']:.1f} s = {s['scoring'] / busy:.2f} x the sum -> overlap "
          f"{'PASS' if s['scoring'] < 0.9 * busy else 'FAIL'}")
    print("  peak memory by number of studies: " + ", ".join(f"{n}: {mb} MB" for n, mb in peaks.items()))

    # 2. one process per study
    if not args.no_separate:
        total = 0.0
        studies = sorted((export / "dicom").iterdir())[: args.cases]
        sep_root = work / "separate"
        shutil.rmtree(sep_root, ignore_errors=True)
        t0 = time.perf_counter()
        for i, study in enumerate(studies):
            cmd = [sys.executable, "-m", "medpipe.cli", "score", str(study), "--model", str(model), "--out",
                   str(sep_root / f"{i:03d}"), "--quiet", "--cpu-threads", str(args.cpu_threads)]
            wall, _, _ = _popen_peak(cmd)
            total += wall
        elapsed = time.perf_counter() - t0
        results["separate_processes"] = {"wall": elapsed, "per_study_mean": total / len(studies)}
        ratio = elapsed / one["wall"]
        print(f"one process per study ({len(studies)} x `medpipe score`): {elapsed:.1f} s, "
              f"{total / len(studies):.2f} s per study -> the single process is {ratio:.1f}x faster "
              f"({'PASS' if ratio >= 3 else 'FAIL'}: target >= 3x)")
        results["speedup"] = ratio

    # 3. accuracy of the scored volumes
    truth = {r["study_uid"]: float(r["whole_tumor_ml"]) for r in csv.DictReader(open(export / "labels.csv"))}
    rows = list(csv.DictReader(open(work / f"one_{args.cases}" / "scores.csv")))
    errs = [abs(float(r["whole_tumour_ml"]) - truth[r["study_uid"]]) for r in rows if r["status"] == "ok"]
    pos = [r for r in rows if truth.get(r["study_uid"], 0) > 0]
    found = sum(1 for r in pos if float(r["whole_tumour_ml"]) > 0)
    neg = [r for r in rows if truth.get(r["study_uid"], 0) == 0]
    fp = sum(1 for r in neg if float(r["whole_tumour_ml"]) > 0)
    results["accuracy"] = {"mean_abs_volume_error_ml": sum(errs) / len(errs), "tumours_found": found,
                           "tumours": len(pos), "false_positive_studies": fp, "tumour_free": len(neg)}
    print(f"accuracy: mean |scored - true| whole-tumour volume {sum(errs) / len(errs):.2f} mL; tumour found in "
          f"{found}/{len(pos)} studies with tumour; {fp}/{len(neg)} tumour-free studies with any voxel")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
