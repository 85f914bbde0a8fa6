"""FROC / CPM (:mod:`medpipe.metrics.detection`) against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medpipe.metrics.detection import FP_RATES, froc, froc_with_ci, match_scan


def test_hit_is_centre_distance_below_the_radius() -> None:
    # nodule at the origin, 10 mm: radius 5. Detections at 4.9 mm (hit), exactly 5 mm (not: strictly below) and 7 mm
    m = match_scan([[4.9, 0, 0], [0, 5.0, 0], [0, 0, 7]], [0.9, 0.8, 0.7], [[0, 0, 0]], [10.0])
    assert m.nodule_scores.tolist() == [0.9]
    assert m.fp_scores.tolist() == [0.8, 0.7]
    assert m.hits.tolist() == [0, -1, -1]


def test_extra_hits_on_a_found_nodule_are_not_false_positives_and_the_best_score_counts() -> None:
    m = match_scan([[1, 0, 0], [0, 1, 0], [50, 50, 50]], [0.3, 0.6, 0.2], [[0, 0, 0]], [6.0])
    assert m.nodule_scores.tolist() == [0.6]
    assert m.fp_scores.tolist() == [0.2]


def test_one_detection_may_hit_two_overlapping_nodules() -> None:
    m = match_scan([[0, 0, 0]], [0.5], [[1, 0, 0], [-1, 0, 0]], [4.0, 4.0])
    assert m.nodule_scores.tolist() == [0.5, 0.5]
    assert m.fp_scores.size == 0


def test_empty_scans() -> None:
    m = match_scan(np.zeros((0, 3)), [], [[0, 0, 0]], [8.0])
    assert m.nodule_scores.tolist() == [-math.inf] and m.fp_scores.size == 0
    m = match_scan([[0, 0, 0]], [0.4], np.zeros((0, 3)), [])
    assert m.fp_scores.tolist() == [0.4] and m.hits.tolist() == [-1]


def _scans() -> list:
    """Two scans, 4 nodules (radius 5 mm at x = 0, 100, 200 in scan A; x = 0 in scan B).

    Scan A: nodule 1 hit at 0.9, nodule 2 hit at 0.5, nodule 3 never; FPs at 0.8 and 0.3.
    Scan B: nodule 1 hit at 0.6; FPs at 0.7, 0.4, 0.2 and 0.1.
    """
    a = match_scan([[0, 0, 0], [100, 1, 0], [0, 60, 0], [0, -60, 0]], [0.9, 0.5, 0.8, 0.3],
                   [[0, 0, 0], [100, 0, 0], [200, 0, 0]], [10, 10, 10])
    b = match_scan([[0, 0, 2], [0, 80, 0], [0, 90, 0], [0, 95, 0], [0, 99, 0]], [0.6, 0.7, 0.4, 0.2, 0.1],
                   [[0, 0, 0]], [10])
    return [a, b]


def test_froc_by_hand() -> None:
    """Thresholds high to low (TP of 4 nodules, FP over 2 scans):
    0.9: TP 1, FP 0 -> sens .25 at 0 FP/scan
    0.8: TP 1, FP 1 -> .25 at .5
    0.7: TP 1, FP 2 -> .25 at 1
    0.6: TP 2, FP 2 -> .50 at 1
    0.5: TP 3, FP 2 -> .75 at 1
    0.4: TP 3, FP 3 -> .75 at 1.5
    0.3: TP 3, FP 4 -> .75 at 2
    0.2, 0.1: FP 5, 6 -> .75 at 2.5, 3
    Sensitivity at <= r FP/scan: 1/8 -> .25, 1/4 -> .25, 1/2 -> .25, 1 -> .75, 2 -> .75, 4 -> .75, 8 -> .75.
    CPM = (3 * .25 + 4 * .75) / 7 = 3.75 / 7."""
    f = froc(_scans())
    assert f.n_scans == 2 and f.n_nodules == 4
    assert f.at_rates == {0.125: 0.25, 0.25: 0.25, 0.5: 0.25, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    assert f.cpm == pytest.approx(3.75 / 7)
    assert f.fps.tolist() == [0, 0, 0.5, 1, 1, 1, 1.5, 2, 2.5, 3]
    assert f.sensitivity.tolist() == [0, 0.25, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75]
    assert f.threshold_at(1.0) == 0.5  # the lowest threshold with at most 1 FP per scan
    assert f.threshold_at(0.0) == 0.9


def test_perfect_and_useless_detectors() -> None:
    perfect = match_scan([[0, 0, 0]], [0.9], [[0, 0, 0]], [10])
    assert froc([perfect]).cpm == 1.0
    # the nodule is only found below a threshold that already lets 10 FPs per scan through: 8 FP/scan is not enough
    noisy = match_scan([[0, 0, 0], *[[0, 50 + i * 10, 0] for i in range(10)]], [0.1, *[0.5] * 10], [[0, 0, 0]], [10])
    assert froc([noisy]).cpm == 0.0
    # ties: a nodule and a false positive at the same score enter together
    tie = match_scan([[0, 0, 0], [0, 50, 0]], [0.5, 0.5], [[0, 0, 0]], [10])
    assert froc([tie]).at_rates[0.5] == 0.0 and froc([tie]).at_rates[1.0] == 1.0


def test_no_nodules_gives_undefined_sensitivity() -> None:
    f = froc([match_scan([[0, 0, 0]], [0.5], np.zeros((0, 3)), [])])
    assert math.isnan(f.cpm) and all(math.isnan(v) for v in f.at_rates.values())
    with pytest.raises(ValueError):
        froc([])


def test_bootstrap_resamples_scans_and_brackets_the_estimate() -> None:
    scans = _scans() * 3  # 6 scans
    f, ci = froc_with_ci(scans, seed=0, n=200)
    assert f.cpm == pytest.approx(3.75 / 7)
    lo, hi = ci["cpm"]
    assert lo <= f.cpm <= hi and lo < hi
    assert set(ci) == {"cpm", *(f"sens@{r:g}" for r in FP_RATES)}
    assert froc_with_ci(scans, seed=0, n=200)[1] == ci  # seeded
