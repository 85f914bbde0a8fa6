#!/usr/bin/env python
"""How long ``medpipe validate`` takes on every bundled pipeline: first time (empty cache) and again.

    python benchmarks/validate.py [--repeat 3]

The target (issue "hardening"): under 2 s. A first validation builds every MONAI transform the file names,
which imports MONAI and torch (about 2 s on 2 cores by themselves); each outcome is remembered in the user's
cache folder, so validating again (the usual edit-validate loop: one transform changed at most) imports neither.
Peer, measured in the same run: ``python -c "import torch, monai.transforms"`` (the import floor of any tool
that checks MONAI transforms by building them) and ``medpipe --version`` (process start-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDPIPE = [sys.executable, "-m", "medpipe.cli"]


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pipelines = sorted((REPO / "pipelines").glob("*.yaml"))
    print(f"{'pipeline':<28}{'first (s)':>11}{'again (s)':>11}{'first/again':>13}")
    worst_again = 0.0
    for pipeline in pipelines:
        firsts, agains = [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "MEDPIPE_CACHE_DIR": cache}
                firsts.append(_time([*MEDPIPE, "validate", str(pipeline)], env))
                agains.append(_time([*MEDPIPE, "validate", str(pipeline)], env))
        first, again = statistics.median(firsts), statistics.median(agains)
        worst_again = max(worst_again, again)
        print(f"{pipeline.name:<28}{first:>11.2f}{again:>11.2f}{first / again:>12.1f}x")
    env = dict(os.environ)
    floor = statistics.median(_time([sys.executable, "-c", "import torch, monai.transforms"], env)
                              for _ in range(args.repeat))
    start = statistics.median(_time([*MEDPIPE, "--version"], env) for _ in range(args.repeat))
    print(f"peer: import torch + monai.transforms {floor:.2f} s; medpipe --version {start:.2f} s")
    print(f"slowest repeated validation {worst_again:.2f} s = {worst_again / floor:.2f}x the torch+MONAI import "
          f"floor; target < 2 s: {'MET' if worst_again < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
