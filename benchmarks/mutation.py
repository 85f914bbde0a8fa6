#!/usr/bin/env python
"""Mutation score per module of the code where a silent error corrupts results (mutmut).

    python benchmarks/mutation.py                               # every module in [tool.mutmut] only_mutate
    python benchmarks/mutation.py medpipe.dicom.geometry ...    # some of them
    python benchmarks/mutation.py --report                      # the scores of the last run, no new run

mutmut (configured in ``pyproject.toml``, ``[tool.mutmut]``) copies the package to ``mutants/``, makes
small changes to one function at a time (an operator, a constant, a comparison) and runs the tests
that cover that function against each change. A *killed* mutant made a test fail; a *survived* one
is a change no test noticed: either a missing test or an equivalent mutant (a change that cannot
alter behaviour). The score is detected / (detected + survived + no tests), detected being killed
or timed out (the mutant made a test hang); a mutant that no test reaches counts as a survivor.
Equivalent survivors are listed with their reason in ``benchmarks/mutation_equivalent.txt``
(``<mutant name>  <reason>``): they leave the score's denominator and count as *explained* (detected
or equivalent, over all). ``not run`` counts the mutants the last run did not reach (a partial run).
mutmut renumbers a function's mutants when its source changes: rerun and check the list then.

Not in CI: it runs the tests once per mutant (minutes to an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = Path(__file__).resolve().parent / "mutation_equivalent.txt"


def _modules() -> list[str]:
    import tomllib

    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    return [p.removesuffix(".py").replace("/", ".") for p in conf["only_mutate"]]


def _results() -> dict[str, str]:
    """Mutant name -> status, from ``mutmut results --all true``."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=REPO,
                         capture_output=True, text=True, check=False).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\w.]+__mutmut_\d+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def _equivalent() -> dict[str, str]:
    if not EQUIVALENT.is_file():
        return {}
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def report(modules: list[str]) -> int:
    """Print the per-module table of the last run; 1 when a listed equivalent is no longer a survivor."""
    results = _results()
    equivalent = _equivalent()
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in results.items():
        module = next((m for m in modules if name.startswith(m + ".")), None)
        if module is None:
            continue
        if status == "survived" and name in equivalent:
            status = "equivalent"
        by_module[module][status] += 1
        if status in ("survived", "no tests"):
            survivors[module].append(f"{name}  ({status})")
    # score: detected / (detected + survived + no tests), where detected = killed or timed out (a mutant that
    # makes a test hang is caught too); equivalent mutants are left out (they cannot be killed);
    # explained: detected or listed as equivalent, over every mutant that was run
    print(f"{'module':<32} {'killed':>7} {'survived':>9} {'equivalent':>11} {'no tests':>9} {'timeout':>8} "
          f"{'not run':>8} {'score':>7} {'explained':>10}")
    for module in modules:
        c = by_module.get(module, Counter())
        killed, survived, equiv, untested = c["killed"], c["survived"], c["equivalent"], c["no tests"]
        killed += c["timeout"]
        decided = killed + survived + untested
        score = f"{killed / decided:.1%}" if decided else "n/a"
        explained = f"{(killed + equiv) / (decided + equiv):.1%}" if decided + equiv else "n/a"
        print(f"{module:<32} {c['killed']:>7} {survived:>9} {equiv:>11} {untested:>9} {c['timeout']:>8} "
              f"{c['not checked']:>8} {score:>7} {explained:>10}")
    for module, names in survivors.items():
        print(f"\nnot killed in {module} ({len(names)}): `mutmut show NAME` shows the change")
        for name in sorted(names):
            print(f"  {name}")
    stale = sorted(n for n in equivalent if results.get(n) not in (None, "survived")
                   and any(n.startswith(m + ".") for m in modules))
    if stale:
        print(f"\nlisted as equivalent in {EQUIVALENT.name} but {', '.join(f'{n}: {results[n]}' for n in stale)}")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help="dotted module names (default: all configured)")
    ap.add_argument("--report", action="store_true", help="only print the last run's scores")
    ap.add_argument("--max-children", type=int, default=2)
    args = ap.parse_args(argv)
    modules = args.modules or _modules()
    if not args.report:
        # the tests run from mutants/, where ../shared/data is not the real data folder; one torch thread
        # per mutant process (--max-children of them share the cores)
        env = {**os.environ, "MEDPIPE_TEST_DATA": str((REPO / ".." / "shared" / "data").resolve()),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
               *[f"{m}.*" for m in modules]]
        subprocess.run(cmd, cwd=REPO, env=env, check=False, stdout=subprocess.DEVNULL)
    return report(modules)


if __name__ == "__main__":
    sys.exit(main())
