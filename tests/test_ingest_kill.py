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
    generate_brain_tumor(out, cases=4, seed=3, matrix=96, slices=24)
    return out


def _ingest_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medpipe.cli", "ingest", str(src), "--out", str(out), "--quiet", "--workers", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.6, 1.2, 1.8])
def test_kill_then_rerun_matches_clean_run(export: Path, tmp_path: Path, delay: float) -> None:
    before = sha256_tree(export)
    clean = tmp_path / "clean"
    subprocess.run(_ingest_cmd(export, clean), check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_ingest_cmd(export, killed), start_new_session=True)
    time.sleep(delay)
    if proc.poll() is None:
        import os

        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, no clean-up
    proc.wait()
    subprocess.run(_ingest_cmd(export, killed), check=True)

    assert _outputs(killed) == _outputs(clean)
    assert not [p for p in killed.rglob("*") if p.name.startswith(TMP_PREFIX) or ".tmp" in p.name]
    assert sha256_tree(export) == before  # sources never written
