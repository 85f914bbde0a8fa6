"""The bootstrap intervals against resamples recomputed here, and their edge cases.

The resamples are the documented ones (``np.random.default_rng([seed, 0xB007])``, one row of case
indices per resample), so each interval can be recomputed independently; each test says which slip it
catches when that is not obvious (these are the tests mutation testing found missing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medpipe.metrics import bootstrap
from medpipe.metrics.bootstrap import bootstrap_cases, bootstrap_ci


def _means(values: np.ndarray, seed: int, n: int) -> np.ndarray:
    idx = np.random.default_rng([seed, 0xB007]).integers(0, values.size, size=(n, values.size))
    return values[idx].mean(1)


def test_bootstrap_ci_defaults_are_2000_resamples_and_95_percent() -> None:
    values = np.random.default_rng(1).normal(size=30)
    lo, hi = bootstrap_ci(values, seed=2)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(_means(values, 2, 2000), [0.025, 0.975])), abs=1e-12)
    lo50, hi50 = bootstrap_ci(list(values), seed=2, level=0.5)
    assert (lo50, hi50) == pytest.approx(tuple(np.quantile(_means(values, 2, 2000), [0.25, 0.75])), abs=1e-12)
    assert type(lo) is float and type(hi) is float


def test_bootstrap_ci_computes_in_double_precision() -> None:
    # per-case values often come as float32 (torch, MONAI): the interval is that of their float64 values
    values = np.random.default_rng(3).uniform(0.5, 1.0, size=37).astype(np.float32)
    assert bootstrap_ci(values, seed=1, n=500) == bootstrap_ci(values.astype(np.float64), seed=1, n=500)
    assert bootstrap_ci(list(values), seed=1, n=500) == bootstrap_ci(values.astype(np.float64), seed=1, n=500)


def test_bootstrap_ci_drops_nans_and_needs_two_values() -> None:
    values = [0.2, math.nan, 0.9, 0.4]
    assert bootstrap_ci(values, seed=0, n=300) == bootstrap_ci([0.2, 0.9, 0.4], seed=0, n=300)
    for few in ([], [0.5], [0.5, math.nan]):
        assert all(math.isnan(x) for x in bootstrap_ci(few, seed=0))
    assert all(math.isnan(x) for x in bootstrap_ci([0.1, 0.2, 0.3], seed=0, n=0))
    lo, hi = bootstrap_ci([0.0, 1.0], seed=0, n=500)  # two values: defined
    assert 0.0 <= lo < hi <= 1.0


def test_bootstrap_cases_checks_its_arguments() -> None:
    def stat(idx: np.ndarray) -> dict[str, float]:
        return {"n": float(len(idx))}

    with pytest.raises(ValueError, match="resamples must be >= 0, not -1"):
        bootstrap_cases(stat, 5, seed=0, n=-1)
    with pytest.raises(ValueError, match="cases must be >= 0, not -1"):
        bootstrap_cases(stat, -1, seed=0)
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"level must lie in \\(0, 1\\), not {level}"):
            bootstrap_cases(stat, 5, seed=0, level=level)
    assert bootstrap_cases(stat, 0, seed=0)["n"] == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_bootstrap_cases_without_resamples_still_names_the_metrics() -> None:
    seen: list[np.ndarray] = []

    def stat(idx: np.ndarray) -> dict[str, float]:
        seen.append(idx)
        return {"a": 1.0, "b": 2.0}

    out = bootstrap_cases(stat, 1, seed=0)
    assert set(out) == {"a", "b"} and all(math.isnan(x) for v in out.values() for x in v)
    assert len(seen) == 1 and np.array_equal(seen[0], [0])  # evaluated once on every case
    out = bootstrap_cases(stat, 3, seed=0, n=0)
    assert set(out) == {"a", "b"} and np.array_equal(seen[1], [0, 1, 2])

    def vstat(idx: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(idx)
        return {"v": np.full(idx.shape[0], 3.0)}

    out = bootstrap_cases(vstat, 3, seed=0, n=0, vectorized=True)
    assert set(out) == {"v"} and all(math.isnan(x) for x in out["v"])
    assert seen[-1].shape == (1, 3) and np.array_equal(seen[-1], [[0, 1, 2]])


def test_bootstrap_cases_level_and_seed() -> None:
    values = np.random.default_rng(4).normal(size=25)

    def mean(idx: np.ndarray) -> dict[str, float]:
        return {"m": float(values[idx].mean())}

    means = _means(values, 6, 700)
    assert bootstrap_cases(mean, 25, seed=6, n=700)["m"] == pytest.approx(
        tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert bootstrap_cases(mean, 25, seed=6, n=700, level=0.8)["m"] == pytest.approx(
        tuple(np.quantile(means, [0.1, 0.9])), abs=1e-12)
    # default: 2000 resamples
    assert bootstrap_cases(mean, 25, seed=6)["m"] == pytest.approx(
        tuple(np.quantile(_means(values, 6, 2000), [0.025, 0.975])), abs=1e-12)


def test_vectorized_and_blocked_resamples_are_the_same_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks (several draws of the index matrix) give the same intervals as one block, vectorised
    or not; guards the block size arithmetic and the per-block bookkeeping."""
    values = np.random.default_rng(7).normal(size=10)

    def mean(idx: np.ndarray) -> dict[str, float]:
        return {"m": float(values[idx].mean())}

    def vmean(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": values[idx].mean(axis=1)}

    one_block = bootstrap_cases(mean, 10, seed=1, n=95)
    assert bootstrap_cases(vmean, 10, seed=1, n=95, vectorized=True) == one_block
    calls: list[int] = []

    def counted(idx: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(idx.shape[0])
        return vmean(idx)

    monkeypatch.setattr(bootstrap, "_BLOCK_ELEMENTS", 10 * 7 + 3)  # blocks of 7 resamples of 10 cases
    blocked = bootstrap_cases(counted, 10, seed=1, n=95, vectorized=True)
    assert calls == [7] * 13 + [4]
    # the stream of indices is drawn block by block: recompute it the same way
    rng = np.random.default_rng([1, 0xB007])
    idx = np.concatenate([rng.integers(0, 10, size=(b, 10)) for b in calls])
    assert blocked["m"] == pytest.approx(tuple(np.quantile(values[idx].mean(1), [0.025, 0.975])), abs=1e-12)
    assert bootstrap_cases(mean, 10, seed=1, n=95) == blocked
    monkeypatch.setattr(bootstrap, "_BLOCK_ELEMENTS", 5)  # fewer elements than one resample: blocks of 1
    calls.clear()
    bootstrap_cases(counted, 10, seed=1, n=3, vectorized=True)
    assert calls == [1, 1, 1]


def test_metrics_missing_from_some_resamples_count_as_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "_BLOCK_ELEMENTS", 4 * 5)  # blocks of 5 resamples of 4 cases
    block = iter(range(100))

    def vstat(idx: np.ndarray) -> dict[str, np.ndarray]:
        k = next(block)
        out = {"always": idx.sum(axis=1).astype(float)}
        if k == 1:  # only the second block reports "late"; only the first reports "early"
            out["late"] = np.full(idx.shape[0], 7.0)
        if k == 0:
            out["early"] = np.full(idx.shape[0], 2.0)
        return out

    r = bootstrap_cases(vstat, 4, seed=0, n=15, vectorized=True)
    assert r["late"] == (7.0, 7.0) and r["early"] == (2.0, 2.0)
    assert r["always"][0] < r["always"][1]

    def stat(idx: np.ndarray) -> dict[str, float]:
        return {"first": 1.0} if idx[0] == 0 else {"other": float(idx[0])}

    r = bootstrap_cases(stat, 4, seed=0, n=50)
    assert r["first"] == (1.0, 1.0) and 1.0 <= r["other"][0] <= r["other"][1] <= 3.0


def test_a_statistic_of_the_wrong_length_is_refused() -> None:
    def bad(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros(idx.shape[0] + 1)}

    with pytest.raises(ValueError, match=r"statistic 'm' gave 21 values for 20 resamples"):
        bootstrap_cases(bad, 5, seed=0, n=20, vectorized=True)


def test_two_cases_are_enough_to_resample() -> None:
    values = np.array([0.25, 0.75])

    def mean(idx: np.ndarray) -> dict[str, float]:
        return {"m": float(values[idx].mean())}

    lo, hi = bootstrap_cases(mean, 2, seed=0, n=400)["m"]
    assert (lo, hi) == (0.25, 0.75)  # resamples of two cases: means 0.25, 0.5 or 0.75, each end ~25 %
    assert bootstrap_cases(mean, 2, seed=0, n=400)["m"] == pytest.approx(bootstrap_ci(values, seed=0, n=400))


def test_vectorized_values_of_any_shape_and_precision() -> None:
    """A vectorised statistic may return a column (B, 1) and float32; the interval is that of the float64
    values (guards the flattening and the float64 conversion)."""
    values = np.random.default_rng(8).uniform(size=30)

    def flat(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": values[idx].mean(axis=1).astype(np.float32).astype(np.float64)}

    def column32(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": values[idx].mean(axis=1, keepdims=True).astype(np.float32)}

    ref = bootstrap_cases(flat, 30, seed=2, n=300, vectorized=True)
    assert bootstrap_cases(column32, 30, seed=2, n=300, vectorized=True) == ref
