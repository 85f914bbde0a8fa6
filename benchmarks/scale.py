#!/usr/bin/env python
"""Scale-out on one machine: cohort scoring on Dask vs the local path, DDP training with 1 vs 2 processes.

    python benchmarks/scale.py [--cases 40] [--model MODEL_DIR] [--workdir DIR] [--skip-score] [--skip-ddp]
                               [--json PATH]

**Scoring** (``medpipe score``): the 40-study synthetic brain MR export of ``benchmarks/score.py`` (same
generator, same seed, same model: ``--model``, else trained into the work dir), ingested once; then scored
from the ingested folder, each configuration in a fresh process (so every one loads its libraries and model
itself), one torch thread per scorer, the same content time for all:

* ``local``: the default path (one process; reader, inference and writer threads);
* ``dask local:1`` and ``dask local:2``: a Dask ``LocalCluster`` of 1 or 2 worker processes on 127.0.0.1
  (one task per study, the model loaded once per worker).

Reported: wall time, the cluster's start-up time (``start_cluster``: workers started and the model loaded on
each), studies/min over the whole call and over the time after start-up, and the check that the three runs
wrote byte-identical SEG / SR / preview files.

**Training** (``medpipe run --nproc``): a small segmenter pipeline (synthetic brain MR, 3D UNet) trained with 1
process of 1 and of 2 torch threads, and with 2 DDP processes of 1 thread each (gloo): samples/s per epoch from
``history.csv`` (epochs 2.. only: the first carries warm-up; validation only after the last epoch, which is not
counted), the stage's wall time, and whether the two ranks ended with identical weights.

Results also go to ``benchmarks/results/scale.json``. On a 2-core machine shared with other work, neither Dask
nor DDP can be expected to speed anything up: see the report's notes and ``docs/scale.md``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
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
RESULTS = HERE / "results" / "scale.json"
#: the results' content time, the same for every run (else the DICOM objects differ in their dates alone)
CREATED = "2026-01-02T03:04:05"
sys.path.insert(0, str(HERE))

from score import ensure_export, ensure_model  # benchmarks/score.py: the same export and model

TRAIN = """\
name: scale-ddp
seed: 0
cpu_threads: 1
stages:
  - stage: sample
    out: {sample}
    cases: 10
    tumor_fraction: 0.8
    matrix: 64
    pixel_spacing: 3.5
    slices: 16
    slice_thickness: 8.0
  - stage: ingest
  - stage: dataset
    split: {{val: 0.2, test: 0.0}}
  - stage: train_segmenter
    channels: [8, 16, 32]
    strides: [2, 2]
    roi_size: [32, 32, 16]
    batch_size: 2
    epochs: {epochs}
    val_every: {epochs}
    cache: memory
    snapshot_every: 86400
"""


def child(args: argparse.Namespace) -> None:
    """Score ``--src`` in this process (``--dask`` or the local path); print the report's numbers as JSON."""
    import datetime as dt

    from medpipe.scoring.engine import ScoreOptions, score

    t0 = time.perf_counter()
    report = score(Path(args.src), Path(args.model), Path(args.out),
                   ScoreOptions(cpu_threads=1, dask=args.dask or None, created=dt.datetime.fromisoformat(CREATED)))
    print(json.dumps({"wall": time.perf_counter() - t0, "seconds": report.seconds, "counts": report.counts}))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "results").rglob("*")) if p.is_file()}


def bench_score(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = ensure_model(work, args.model)
    export = ensure_export(work, args.cases)
    ingested = work / f"ingested_{args.cases}"
    if not (ingested / "catalog.sqlite").is_file():
        shutil.rmtree(ingested, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "medpipe.cli", "ingest", str(export / "dicom"), "--out", str(ingested),
                        "--workers", "1"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    out: dict[str, Any] = {"cases": args.cases, "model": str(model)}
    outputs: dict[str, dict[str, bytes]] = {}
    for name, spec in (("local", ""), ("dask local:1", "local:1"), ("dask local:2", "local:2")):
        target = work / f"scored_{name.replace(' ', '_').replace(':', '')}"
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--src", str(ingested), "--model",
               str(model), "--out", str(target), "--dask", spec]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        process_wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        start = doc["seconds"].get("start_cluster", 0.0) if spec else doc["seconds"].get("load_model", 0.0)
        doc.update({"process_wall": process_wall, "startup": start,
                    "studies_per_min": 60 * args.cases / doc["wall"],
                    "studies_per_min_after_startup": 60 * args.cases / max(doc["wall"] - start, 1e-9)})
        out[name] = doc
        outputs[name] = _files(target)
        print(f"score {name:>13}: {doc['wall']:6.1f} s in score() ({process_wall:5.1f} s with the process start), "
              f"start-up {start:4.1f} s ({'cluster + model on every worker' if spec else 'model load'}) -> "
              f"{doc['studies_per_min']:6.1f} studies/min, {doc['studies_per_min_after_startup']:6.1f} after "
              f"start-up; {doc['counts']}", flush=True)
    same = outputs["dask local:1"] == outputs["local"] == outputs["dask local:2"]
    out["identical_outputs"] = same
    print(f"  SEG / SR / preview files of the three runs byte-identical: {'PASS' if same else 'FAIL'} "
          f"({len(outputs['local'])} files)", flush=True)
    return out


def _epoch_rates(run: Path, n_train: int) -> list[float]:
    with open(run / "stages" / "03_train_segmenter" / "history.csv", newline="") as fh:
        seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return [n_train / (b - a) for a, b in itertools.pairwise(seconds)]


def bench_ddp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / "ddp"
    root.mkdir(parents=True, exist_ok=True)
    pipeline = root / "train.yaml"
    pipeline.write_text(TRAIN.format(sample=root / "sample", epochs=args.epochs))
    out: dict[str, Any] = {"epochs": args.epochs}
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        run = root / f"nproc{nproc}x{threads}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [sys.executable, "-m", "medpipe.cli", "run", str(pipeline), "--out", str(run), "--set",
               f"cpu_threads={threads}"] + (["--nproc", str(nproc)] if nproc > 1 else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"--nproc {nproc} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        metrics = json.loads((run / "metrics.json").read_text())["stages"]
        n_train = int(metrics["02_dataset"]["n_train"])
        rates = _epoch_rates(run, n_train)
        log = (run / "run.log").read_text()
        doc = {"threads_per_process": threads, "n_train": n_train, "samples_per_s_by_epoch": rates,
               "samples_per_s": sum(rates) / len(rates), "train_stage_seconds": metrics["03_train_segmenter"][
                   "train_stage_seconds"], "command_wall": wall, "best_val_dice": metrics["03_train_segmenter"][
                   "best_val_dice"], "identical_weights": "identical on all 2 ranks" in log if nproc > 1 else None}
        out[f"nproc {nproc} x {threads} thread(s)"] = doc
        print(f"ddp --nproc {nproc} ({threads} thread(s) each): {doc['samples_per_s']:.2f} samples/s per epoch "
              f"(epochs 2-{args.epochs}: {', '.join(f'{r:.2f}' for r in rates)}), train stage "
              f"{doc['train_stage_seconds']:.1f} s, whole run {wall:.1f} s, val Dice {doc['best_val_dice']}"
              + (f", weights identical on both ranks: {'PASS' if doc['identical_weights'] else 'FAIL'}"
                 if nproc > 1 else ""), flush=True)
    return out


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--model", default=None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workdir", default=str(HERE / "work" / "score"))
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dask", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_before": _load()}
    print(f"machine: {results['load_before']}", flush=True)
    if not args.skip_score:
        results["score"] = bench_score(args, work)
    if not args.skip_ddp:
        results["ddp"] = bench_ddp(args, work)
    results["load_after"] = _load()
    print(f"machine: {results['load_after']}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
