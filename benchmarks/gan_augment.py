#!/usr/bin/env python
"""BreastMNIST classifier test metrics with and without GAN augmentation, over several seeds.

    python benchmarks/gan_augment.py [--seeds 0 1 2] [--out DIR] [--set key=value ...] [--report-only]
                                     [--json PATH]

Runs ``medpipe run pipelines/gan_augment.yaml --set seed=K --out DIR/seed_K`` for each seed (with
``--resume`` when that folder already holds a run, so an interrupted benchmark continues where it
stopped). The pipeline trains the same classifier twice on the same official split with the same
seed, once on the real train split and once on it plus synthetic malignant images from
``train_gan`` + ``augment``, and evaluates both on the same test split. This script then reads each
run's ``metrics.json`` (``stages`` entries: the first ``evaluate_classifier`` = without, the last =
with augmentation; ``train_gan`` = the FID numbers) and prints per seed and as mean ± sd (and the
paired with-minus-without difference) the test AUC, accuracy, sensitivity and specificity
(positive class: malignant). Results also go to ``benchmarks/results/gan_augment.json`` (``--json``).

One seed takes about 8 minutes on one CPU thread (two classifiers of ~3 minutes, the GAN ~2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PIPELINE = REPO / "pipelines" / "gan_augment.yaml"
RESULTS = HERE / "results" / "gan_augment.json"
METRICS = ("auc", "accuracy", "sensitivity", "specificity")
GAN_METRICS = ("gan_fid", "gan_fid_matched", "gan_fid_real_reference", "gan_target_class_rate", "gan_seconds")


def run_seed(seed: int, out: Path, overrides: list[str]) -> float:
    """Run the pipeline for one seed into ``out`` (resuming a run already there); return the wall time."""
    exe = Path(sys.executable).parent / "medpipe"  # the console script of this environment
    cmd = [str(exe) if exe.is_file() else (shutil.which("medpipe") or "medpipe"), "run", str(PIPELINE),
           "--out", str(out), "--set", f"seed={seed}"]
    for o in overrides:
        cmd += ["--set", o]
    if (out / "state.json").is_file():
        cmd.append("--resume")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - t0


def read_run(out: Path) -> dict[str, Any]:
    """``{"without": {...}, "with": {...}, "gan": {...}}`` from one run's ``metrics.json``."""
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    stages = doc["stages"]
    evals = sorted(k for k in stages if k.split("_", 1)[1] == "evaluate_classifier")
    gans = [k for k in stages if k.split("_", 1)[1] == "train_gan"]
    if len(evals) < 2 or not gans:
        raise SystemExit(f"{out}: the run is incomplete (stages done: {', '.join(sorted(stages))})")
    return {"without": {m: stages[evals[0]].get(m) for m in METRICS},
            "with": {m: stages[evals[-1]].get(m) for m in METRICS},
            "gan": {m: stages[gans[0]].get(m) for m in GAN_METRICS}}


def _mean_sd(values: list[float | None]) -> tuple[float, float] | None:
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def _fmt(ms: tuple[float, float] | None, signed: bool = False) -> str:
    if ms is None:
        return "n/a"
    return f"{ms[0]:+.3f} ± {ms[1]:.3f}" if signed else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def report(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Print the tables; return the summary that goes to the JSON file."""
    seeds = sorted(runs)
    print(f"\nBreastMNIST test split (positive class: malignant), seeds {seeds}")
    print(f"{'seed':>4}  {'arm':<22}" + "".join(f"{m:>13}" for m in METRICS))
    for s in seeds:
        for arm, label in (("without", "without GAN"), ("with", "with GAN augmentation")):
            row = runs[s][arm]
            print(f"{s:>4}  {label:<22}" + "".join(f"{'n/a' if row[m] is None else f'{row[m]:.3f}':>13}"
                                                  for m in METRICS))
    summary: dict[str, Any] = {"seeds": seeds, "without": {}, "with": {}, "difference": {}}
    print(f"\n{'mean ± sd':<28}" + "".join(f"{m:>17}" for m in METRICS))
    for arm, label in (("without", "without GAN"), ("with", "with GAN augmentation")):
        cells = []
        for m in METRICS:
            ms = _mean_sd([runs[s][arm][m] for s in seeds])
            summary[arm][m] = ms
            cells.append(_fmt(ms))
        print(f"{label:<28}" + "".join(f"{c:>17}" for c in cells))
    cells = []
    for m in METRICS:
        diffs = [runs[s]["with"][m] - runs[s]["without"][m] for s in seeds
                 if runs[s]["with"][m] is not None and runs[s]["without"][m] is not None]
        ms = _mean_sd(diffs)
        summary["difference"][m] = ms
        cells.append(_fmt(ms, signed=True))
    print(f"{'with - without (paired)':<28}" + "".join(f"{c:>17}" for c in cells))
    print("\nGAN quality (class 0, features of a ResNet trained in the train_gan stage; lower FID is better)")
    print(f"{'seed':>4}" + "".join(f"{m:>24}" for m in GAN_METRICS))
    for s in seeds:
        g = runs[s]["gan"]
        print(f"{s:>4}" + "".join(f"{'n/a' if g[m] is None else f'{g[m]:.3f}':>24}" for m in GAN_METRICS))
    summary["gan"] = {m: _mean_sd([runs[s]["gan"][m] for s in seeds]) for m in GAN_METRICS}
    better = [m for m in METRICS if (summary["difference"].get(m) or (0.0, 0.0))[0] > 0]
    worse = [m for m in METRICS if (summary["difference"].get(m) or (0.0, 0.0))[0] < 0]
    print(f"\nmean difference with - without: higher with GAN: {', '.join(better) or 'none'}; "
          f"lower with GAN: {', '.join(worse) or 'none'}"
          + ("" if len(seeds) > 2 else "  (fewer than 3 seeds: not a conclusion)"))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(REPO / "runs" / "gan_augment_bench"), help="one seed_K folder per seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to medpipe run --set")
    ap.add_argument("--report-only", action="store_true", help="only read the runs already in --out")
    ap.add_argument("--json", default=str(RESULTS), help="where the results go")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    runs: dict[int, dict[str, Any]] = {}
    seconds: dict[int, float] = {}
    for seed in args.seeds:
        folder = out / f"seed_{seed}"
        if not args.report_only:
            seconds[seed] = round(run_seed(seed, folder, args.overrides), 1)
        runs[seed] = read_run(folder)
    summary = report(runs)
    results = Path(args.json)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"pipeline": str(PIPELINE.relative_to(REPO)), "overrides": args.overrides,
                                   "runs": {str(s): r for s, r in runs.items()}, "wall_seconds": seconds,
                                   "summary": summary}, indent=1) + "\n", encoding="utf-8")
    print(f"\n-> {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
