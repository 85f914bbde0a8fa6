#!/usr/bin/env python
"""Wall time per stage of ``pipelines/brain_tumor.yaml`` (the main job) and the Dice it reaches.

    python benchmarks/pipeline.py [--pipeline pipelines/brain_tumor.yaml] [--out DIR] [--set key=value ...]
                                  [--device auto|cpu|cuda] [--keep]

Runs ``medpipe run PIPELINE --out DIR`` as a child process (a fresh run directory, so every stage
runs; the sample data folder named in the pipeline is reused when it already holds the same
generation, as in a user's second run), times the whole command, then reads the run directory's
``state.json`` (seconds per stage, as the runner measured them) and ``metrics.json``. Prints one row
per stage, the total against the 10-minute budget, the held-out whole-tumour Dice with its
bootstrap 95 % CI, and the machine load (other processes' CPU use while the benchmark ran, from
``/proc/stat``: on a shared machine the times are slower than on a quiet one). Everything also goes
to ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "pipeline.json"
BUDGET_S = 600.0
TARGET_DICE = 0.85


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (0, 0 where unavailable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _own_ticks() -> int:
    """CPU jiffies used by this process and its reaped children."""
    t = os.times()
    return int((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=str(REPO / "pipelines" / "brain_tumor.yaml"))
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to medpipe run --set")
    ap.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)

    tmp = None
    if args.out:
        run_dir = Path(args.out).resolve()
        if run_dir.exists():
            print(f"error: {run_dir} exists; the benchmark needs a fresh run directory", file=sys.stderr)
            return 2
    else:
        tmp = Path(tempfile.mkdtemp(prefix="medpipe-bench-pipeline-"))
        run_dir = tmp / "run"
    medpipe = shutil.which("medpipe")
    cmd = [medpipe] if medpipe else [sys.executable, "-m", "medpipe.cli"]
    cmd += ["run", args.pipeline, "--out", str(run_dir)]
    for o in args.overrides:
        cmd += ["--set", o]
    if args.device:
        cmd += ["--device", args.device]

    print("$ " + " ".join(cmd), flush=True)
    busy0, total0 = _cpu_ticks()
    own0 = _own_ticks()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    busy1, total1 = _cpu_ticks()
    own1 = _own_ticks()
    ncpu = os.cpu_count() or 1
    other = max(0, (busy1 - busy0) - (own1 - own0))
    other_cores = other / max(1, total1 - total0) * ncpu if total1 > total0 else float("nan")
    if proc.returncode != 0:
        print(f"error: medpipe run exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode

    state = json.loads((run_dir / "state.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    provenance = json.loads((run_dir / "provenance.json").read_text())
    stages = [(key, float(s.get("seconds", 0.0))) for key, s in state["stages"].items()]
    dice = metrics.get("dice")
    ci = metrics.get("dice_ci95") or [None, None]

    print()
    print(f"{'stage':<22}{'seconds':>9}  metrics")
    for key, secs in stages:
        m = metrics["stages"].get(key, {})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool))
        print(f"{key:<22}{secs:>9.1f}  {shown[:110]}")
    in_stages = sum(s for _, s in stages)
    print(f"{'stages total':<22}{in_stages:>9.1f}")
    print(f"{'medpipe run (wall)':<22}{wall:>9.1f}  (includes start-up, validation, imports)")
    print()
    verdict_t = "PASS" if wall <= BUDGET_S else "MISS"
    print(f"wall time {wall:.0f} s of a {BUDGET_S:.0f} s budget: {verdict_t}")
    if dice is not None:
        verdict_d = "PASS" if dice >= TARGET_DICE else "MISS"
        print(f"held-out whole-tumour Dice {dice:.4f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}, "
              f"{metrics.get('n_with_tumour')} test cases with tumour, {metrics.get('n_cases')} in all; "
              f"HD95 {metrics.get('hd95')} mm): {verdict_d} (target {TARGET_DICE})")
    print(f"device {provenance.get('device')}, {ncpu} CPU cores; other processes used {other_cores:.2f} cores "
          "on average while this ran" + (" (shared machine: times are pessimistic)" if other_cores > 0.3 else ""))

    doc: dict[str, Any] = {
        "command": cmd, "wall_seconds": round(wall, 2), "stage_seconds": dict(stages), "metrics": metrics,
        "device": provenance.get("device"), "cpu_count": ncpu, "other_cores_busy": round(other_cores, 3),
        "host": platform.node(), "versions": provenance.get("versions"), "run_dir": str(run_dir),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    gi = out.parent / ".gitignore"
    if out.parent == RESULTS.parent and not gi.exists():
        gi.write_text("*\n")
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {out}")
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"run directory kept: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
