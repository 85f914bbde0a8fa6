"""Shared fixtures: real third-party data from ``../shared/data`` (or ``$MEDPIPE_TEST_DATA``)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ("tests.pacs_support",)  # private network namespace, a real Orthanc, PACS sample studies


def pytest_configure(config: pytest.Config) -> None:
    """Caches medpipe keeps in the user's folder (transform checks) go to a fresh folder per test run, inherited
    by the ``medpipe`` commands the tests start, so no test depends on what an earlier run remembered."""
    import tempfile

    os.environ["MEDPIPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="medpipe-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("MEDPIPE_CACHE_DIR", ""), ignore_errors=True)


DATA = Path(os.environ.get("MEDPIPE_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


def find_tool(name: str) -> str | None:
    """An executable installed with the test extras: next to this Python (a venv that is not activated), else PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set MEDPIPE_TEST_DATA)")
    return DATA


@pytest.fixture
def one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny networks: one torch thread is faster, and far faster when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def world_compare(data: np.ndarray, affine: np.ndarray, ref_data: np.ndarray, ref_affine: np.ndarray) -> np.ndarray:
    """Map ``data`` onto the reference grid through both affines; return it in the reference's index order.

    Fails the test when the two grids do not hold the same voxel centres (any axis order / flips allowed).
    """
    t = np.linalg.inv(ref_affine) @ affine  # our index -> reference index
    perm = np.round(t[:3, :3])
    assert np.allclose(t[:3, :3], perm, atol=1e-3), f"grids are not related by a permutation/flip:\n{t.round(4)}"
    shift = np.round(t[:3, 3])
    assert np.allclose(t[:3, 3], shift, atol=1e-2), f"grids are offset by a fraction of a voxel: {t[:3, 3]}"
    assert sorted(np.abs(perm).sum(0)) == [1, 1, 1]
    idx = np.indices(data.shape[:3]).reshape(3, -1)
    ridx = (perm @ idx + shift[:, None]).astype(int)
    for a in range(3):
        assert ridx[a].min() >= 0 and ridx[a].max() < ref_data.shape[a], "volume extends beyond the reference grid"
    out = np.zeros(ref_data.shape[:3] + data.shape[3:], dtype=np.float64)
    out[ridx[0], ridx[1], ridx[2]] = data.reshape(idx.shape[1], *data.shape[3:])
    assert np.prod(data.shape[:3]) == np.prod(ref_data.shape[:3]), "different number of voxels"
    return out
