"""Detection metrics: LUNA16-style hits, FROC and the competition performance metric (CPM).

**Hits** (as the LUNA16 challenge's evaluation script): a detection (a point with a score) *hits* a
nodule when its distance to the nodule's centre is below the nodule's radius (``diameter / 2``). A
nodule's score is the highest score of the detections that hit it (it is *found* at every threshold
up to that score); a detection that hits no nodule is a *false positive*; extra detections on a
nodule already hit are neither (they do not count as false positives). A detection may hit two
nodules that overlap, and then counts for both.

**FROC**: over every score threshold ``t``, the sensitivity (nodules with a score ``>= t`` / all
nodules) against the false positives per scan (false positives with a score ``>= t`` / scans).
The sensitivity at ``r`` false positives per scan is the highest sensitivity of a threshold with at
most ``r`` false positives per scan (a step function, read off the curve without interpolation; the
LUNA16 script interpolates linearly between the curve's points, which can credit a sensitivity no
threshold reaches). The **CPM** is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false
positives per scan.

Confidence intervals resample *scans* (:func:`froc_with_ci`, :func:`medpipe.metrics.bootstrap.bootstrap_cases`):
a scan's nodules and false positives stay together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medpipe.metrics.bootstrap import bootstrap_cases

#: the false-positive rates (per scan) of the LUNA16 CPM
FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class ScanMatch:
    """One scan's detections matched to its nodules.

    ``nodule_scores``: per nodule, the highest score of a detection hitting it (``-inf``: never hit);
    ``fp_scores``: the scores of the detections that hit no nodule; ``hits``: per detection, the index of
    the nearest nodule it hits (-1: none).
    """

    nodule_scores: np.ndarray
    fp_scores: np.ndarray
    hits: np.ndarray


def match_scan(det_centres: np.ndarray, det_scores: np.ndarray, centres: np.ndarray, diameters: np.ndarray
               ) -> ScanMatch:
    """Match one scan's detections (``(n, 3)`` points in mm, ``(n,)`` scores) to its nodules (``(m, 3)`` centres in
    mm in the same frame, ``(m,)`` diameters in mm)."""
    det = np.asarray(det_centres, dtype=np.float64).reshape(-1, 3)
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    ctr = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    diam = np.asarray(diameters, dtype=np.float64).reshape(-1)
    if len(det) != len(scores) or len(ctr) != len(diam):
        raise ValueError(f"{len(det)} detections with {len(scores)} scores, {len(ctr)} nodules with {len(diam)} "
                         "diameters")
    dist = np.linalg.norm(det[:, None, :] - ctr[None, :, :], axis=2)  # (n, m)
    hit = dist < diam[None, :] / 2.0
    nodule_scores = np.where(hit, scores[:, None], -np.inf).max(axis=0) if len(det) else np.full(len(ctr), -np.inf)
    fp = ~hit.any(axis=1)
    nearest = np.where(hit, dist, np.inf).argmin(axis=1) if len(ctr) else np.zeros(len(det), dtype=int)
    return ScanMatch(nodule_scores.astype(np.float64), scores[fp], np.where(fp, -1, nearest).astype(int))


@dataclass(frozen=True)
class Froc:
    """A FROC curve (``fps``: false positives per scan, ``sensitivity``, ``thresholds``: the score threshold of
    each point, from high to low) and the sensitivities at :data:`FP_RATES` with their mean (``cpm``)."""

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    at_rates: dict[float, float]
    cpm: float
    n_scans: int
    n_nodules: int

    def threshold_at(self, rate: float) -> float:
        """The lowest score threshold with at most ``rate`` false positives per scan (``inf``: none)."""
        ok = self.fps <= rate
        return float(self.thresholds[ok].min()) if ok.any() else math.inf


def froc(matches: Sequence[ScanMatch], rates: Sequence[float] = FP_RATES) -> Froc:
    """The FROC curve and CPM of the scans ``matches`` (a scan may appear more than once: a bootstrap resample).

    With no nodule the sensitivities are NaN; with no scan, :class:`ValueError`.
    """
    if not matches:
        raise ValueError("FROC of no scan")
    nod = np.concatenate([m.nodule_scores for m in matches]) if matches else np.zeros(0)
    fps = np.concatenate([m.fp_scores for m in matches]) if matches else np.zeros(0)
    n_scans, n_nod = len(matches), len(nod)
    thresholds = np.unique(np.concatenate([nod[np.isfinite(nod)], fps]))[::-1]  # high to low
    thresholds = np.concatenate([[np.inf], thresholds])  # the point (0, 0): nothing reported
    nod_sorted = np.sort(nod)
    fp_sorted = np.sort(fps)
    tp = len(nod_sorted) - np.searchsorted(nod_sorted, thresholds, side="left")
    fp = len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")
    fp_rate = fp / n_scans
    sens = tp / n_nod if n_nod else np.full(len(thresholds), np.nan)
    at: dict[float, float] = {}
    for r in rates:
        ok = fp_rate <= r
        at[float(r)] = float(sens[ok].max()) if n_nod else math.nan
    cpm = float(np.mean(list(at.values()))) if n_nod else math.nan
    return Froc(fp_rate.astype(np.float64), np.asarray(sens, dtype=np.float64), thresholds, at, cpm, n_scans, n_nod)


def froc_with_ci(matches: Sequence[ScanMatch], *, seed: int, n: int = 1000, rates: Sequence[float] = FP_RATES
                 ) -> tuple[Froc, dict[str, tuple[float, float]]]:
    """:func:`froc` and percentile bootstrap 95 % intervals over scans of the CPM (``cpm``) and of every
    sensitivity (``sens@<rate>``)."""
    curve = froc(matches, rates)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        f = froc([matches[int(i)] for i in idx], rates)
        return {"cpm": f.cpm, **{f"sens@{r:g}": v for r, v in f.at_rates.items()}}

    return curve, bootstrap_cases(statistic, len(matches), seed=seed, n=n)
