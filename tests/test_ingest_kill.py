"""A real ``kill -9`` in the middle of an ingest, then a re-run: same outputs as an undisturbed run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medpipe.io import TMP_PREFIX
from medpipe.sample import generate_brain_tumor
from tests.dicom_factory import sha256_tree
from tests.test_ingest_adversarial import _outputs


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kill") / "sample"
    generate_brain_tumor(out, cases=6, seed=3, matrix=128, slices=32)
    return out


def _ingest_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medpipe.cli", "ingest", str(src), "--out", str(out), "--quiet", "--workers", "2"]


def _volumes(out: Path) -> int:
    return sum(1 for p in (out / "volumes").rglob("*.nii.gz") if not p.name.startswith(TMP_PREFIX)) \
        if (out / "volumes").is_dir() else 0


#: when to kill, by what the run has written (not by a delay that a faster ingest outruns): while reading
#: headers (catalog there, no volume yet), after the first volume, and after half of the 24 volumes
KILL_AT = {"scanning": lambda out: (out / "catalog.sqlite").is_file() and _volumes(out) == 0,
           "first_volume": lambda out: _volumes(out) >= 1,
           "half_the_volumes": lambda out: _volumes(out) >= 12}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_AT))
def test_kill_then_rerun_matches_clean_run(export: Path, tmp_path: Path, moment: str) -> None:
    """Guards: a kill that never happens (the test must kill a running ingest, and says so if it could not)."""
    import os

    before = sha256_tree(export)
    clean = tmp_path / "clean"
    subprocess.run(_ingest_cmd(export, clean), check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_ingest_cmd(export, killed), start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not KILL_AT[moment](killed) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"ingest finished before the moment to kill it ({moment}); use a larger export"
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, no clean-up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = _volumes(killed)
    assert partial < _volumes(clean), "killed before the end"
    subprocess.run(_ingest_cmd(export, killed), check=True)

    assert _outputs(killed) == _outputs(clean)
    assert not [p for p in killed.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert sha256_tree(export) == before  # sources never written
