"""Percentile bootstrap confidence intervals, seeded and reproducible.

``bootstrap_ci`` resamples a list of per-case values and takes the mean; ``bootstrap_cases`` resamples
case *indices* and recomputes any set of statistics on each resample (AUC, sensitivity, ...), which is
what metrics that are not a mean of per-case values need.

Both draw their resamples from ``np.random.default_rng([seed, 0xB007])``: the same seed gives the same
interval.

An interval needs at least two cases and at least one resample: with one case (or ``n == 0``) it is
**undefined** and returned as ``(nan, nan)`` (written as ``null`` in JSON, "undefined" in logs), never
as a zero-width interval such as ``[0.806, 0.806]``, which would read as certainty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["bootstrap_cases", "bootstrap_ci"]

#: the resampled index matrix is drawn (and, for vectorised statistics, evaluated) in blocks of at most
#: this many elements, to bound memory for large case counts
_BLOCK_ELEMENTS = 1 << 21

Statistic = Callable[[np.ndarray], Mapping[str, float]]
"""``statistic(indices)``: metrics of the cases ``indices`` (1-D, repeats allowed)."""

VectorStatistic = Callable[[np.ndarray], Mapping[str, np.ndarray]]
"""``statistic(indices)`` with ``indices`` of shape (B, n_cases): one value per row, arrays of shape (B,)."""


def bootstrap_ci(values: list[float] | np.ndarray, *, seed: int, n: int = 2000, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (NaNs dropped; seeded).

    ``(nan, nan)`` (undefined) with fewer than two values or ``n == 0``.
    """
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size < 2 or n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng([seed, 0xB007])
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def bootstrap_cases(statistic: Statistic | VectorStatistic, n_cases: int, *, seed: int, n: int = 2000,
                    level: float = 0.95, vectorized: bool = False) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of statistics computed over resampled cases.

    Each of the ``n`` resamples draws ``n_cases`` case indices with replacement; ``statistic`` maps
    such an index array to ``{metric name: value}``. For every metric name the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles over the resamples are returned. NaN values of a resample (a metric
    undefined on it, e.g. an AUC when the resample holds one class only) are left out of that metric's
    quantiles; a metric NaN on every resample gets ``(nan, nan)``.

    With ``n == 0`` or ``n_cases < 2`` there is nothing to resample: each interval is undefined,
    ``(nan, nan)`` (the statistic is still evaluated once, so its metric names are known).

    ``vectorized=True`` declares that ``statistic`` takes a 2-D index array of shape (B, n_cases), one
    resample per row, and returns one array of shape (B,) per metric; it is then called once per block
    of resamples instead of once per resample. The resamples drawn (and so the interval) do not depend
    on ``vectorized``.
    """
    if n < 0:
        raise ValueError(f"the number of resamples must be >= 0, not {n}")
    if n_cases < 0:
        raise ValueError(f"the number of cases must be >= 0, not {n_cases}")
    if not 0 < level < 1:
        raise ValueError(f"the confidence level must lie in (0, 1), not {level}")

    if n == 0 or n_cases < 2:
        everything = np.arange(n_cases)
        names = statistic(everything[None, :] if vectorized else everything)
        return {k: (math.nan, math.nan) for k in names}

    rng = np.random.default_rng([seed, 0xB007])
    block = max(1, _BLOCK_ELEMENTS // n_cases)
    columns: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n:
        b = min(block, n - done)
        idx = rng.integers(0, n_cases, size=(b, n_cases))
        if vectorized:
            out = statistic(idx)
            vals = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in out.items()}
        else:
            rows = [statistic(row) for row in idx]
            names = list(dict.fromkeys(k for r in rows for k in r))
            vals = {k: np.array([float(r.get(k, math.nan)) for r in rows], dtype=np.float64) for k in names}
        for k, v in vals.items():
            if v.shape != (b,):
                raise ValueError(f"statistic {k!r} gave {v.size} values for {b} resamples")
            # a metric missing from a resample (or a block) counts as NaN there: it is simply not collected
            columns.setdefault(k, []).append(v)
        done += b

    alpha = (1 - level) / 2
    result: dict[str, tuple[float, float]] = {}
    for k, parts in columns.items():
        v = np.concatenate(parts)
        v = v[~np.isnan(v)]
        if v.size == 0:
            result[k] = (math.nan, math.nan)
        else:
            lo, hi = np.quantile(v, [alpha, 1 - alpha])
            result[k] = (float(lo), float(hi))
    return result
