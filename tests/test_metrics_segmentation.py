"""Segmentation metrics against independent computations (each test names the planted bug it catches)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medpipe.metrics.bootstrap import bootstrap_ci
from medpipe.metrics.segmentation import dice_hd95


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _reference_hd(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], q: float) -> float:
    """Symmetric q-th percentile Hausdorff distance between the masks' surfaces (scipy, mm)."""
    pe, te = _edges(pred.astype(bool)), _edges(truth.astype(bool))
    to_truth = ndimage.distance_transform_edt(~te, sampling=spacing)[pe]
    to_pred = ndimage.distance_transform_edt(~pe, sampling=spacing)[te]
    return max(float(np.percentile(to_truth, q)), float(np.percentile(to_pred, q)))


def _pair() -> tuple[np.ndarray, np.ndarray]:
    """A box and the same box shifted one voxel along z, plus a small far-away blob (< 5 % of the surface)."""
    truth = np.zeros((40, 40, 24), np.uint8)
    truth[8:30, 8:30, 6:14] = 1
    pred = np.roll(truth, 1, axis=2)
    pred[36:38, 36:38, 20:22] = 1  # an outlier: sets the maximum, not the 95th percentile
    return pred, truth


def test_hd95_uses_the_voxel_spacing() -> None:
    """Guards: HD95 computed in voxels (spacing ignored)."""
    pred, truth = _pair()
    for spacing in [(1.0, 1.0, 1.0), (0.7, 0.7, 3.0)]:
        _, h = dice_hd95(pred, truth, [1], spacing)[1]
        assert h == pytest.approx(_reference_hd(pred, truth, spacing, 95), abs=1e-4)
    iso = dice_hd95(pred, truth, [1], (1.0, 1.0, 1.0))[1][1]
    aniso = dice_hd95(pred, truth, [1], (1.0, 1.0, 3.0))[1][1]
    assert aniso == pytest.approx(3.0) and iso == pytest.approx(1.0), "one slice of shift is one z-spacing"


def test_hd95_is_the_95th_percentile_not_the_maximum() -> None:
    """Guards: HD95 replaced by the Hausdorff distance (HD100)."""
    pred, truth = _pair()
    spacing = (1.0, 1.0, 2.0)
    _, h = dice_hd95(pred, truth, [1], spacing)[1]
    hd100 = _reference_hd(pred, truth, spacing, 100)
    assert h == pytest.approx(_reference_hd(pred, truth, spacing, 95), abs=1e-4)
    assert hd100 > 3 * h, "the outlier dominates the maximum only"


def test_bootstrap_interval_has_the_level_it_claims() -> None:
    """Guards: a 90 % interval returned under the name ``ci95`` (or any wrong quantiles)."""
    rng = np.random.default_rng(0)
    values = rng.normal(0.8, 0.1, size=40)
    lo, hi = bootstrap_ci(values, seed=5, n=4000)
    # the same resamples, recomputed here: the 2.5 % and 97.5 % quantiles of the resampled means
    means = values[np.random.default_rng([5, 0xB007]).integers(0, values.size, size=(4000, values.size))].mean(1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    lo90, hi90 = bootstrap_ci(values, seed=5, n=4000, level=0.90)
    assert lo < lo90 < hi90 < hi
    # and it matches the normal-theory interval of a mean of 40 values to within the bootstrap's noise
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_validation_loss_is_dice_plus_cross_entropy_and_punishes_confident_over_segmentation() -> None:
    import torch

    from medpipe.metrics.segmentation import validation_dice, validation_loss

    truth = torch.zeros(1, 1, 8, 8, 4, dtype=torch.long)
    truth[0, 0, 2:5, 2:5, 1:3] = 1

    def probs(fg: torch.Tensor) -> torch.Tensor:
        return torch.stack([1 - fg, fg], dim=1).float()

    exact = probs(truth[:, 0].float() * 0.98 + 0.01)
    over = probs(torch.full((1, 8, 8, 4), 0.99))  # everything confidently foreground
    assert validation_loss(exact, truth, 2) < 0.1
    # by hand: mean over the two classes of 1 - soft Dice, plus the mean negative log-probability of the truth
    fg = over[:, 1]
    t = truth[:, 0].float()
    dice_fg = 1 - (2 * (fg * t).sum() + 1e-5) / (fg.sum() + t.sum() + 1e-5)
    dice_bg = 1 - (2 * ((1 - fg) * (1 - t)).sum() + 1e-5) / ((1 - fg).sum() + (1 - t).sum() + 1e-5)
    ce = -torch.log(torch.where(t > 0, fg, 1 - fg)).mean()
    assert validation_loss(over, truth, 2) == pytest.approx(float((dice_fg + dice_bg) / 2 + ce), rel=1e-5)
    assert validation_loss(over, truth, 2) > 2.0 > validation_loss(exact, truth, 2)
    assert validation_dice([(exact, truth)], 2) == pytest.approx(1.0)


def _organ_cases() -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[float, float, float]]:
    """Three tiny 4-organ cases: truth and prediction class maps (values 1..4), on one anisotropic grid."""
    spacing = (1.0, 1.0, 2.0)
    cases = []
    for shift in (0, 1, 2):
        truth = np.zeros((24, 24, 10), np.uint8)
        truth[2:10, 2:10, 1:5] = 1
        truth[12:20, 2:8, 1:5] = 2
        truth[2:8, 14:22, 5:9] = 3
        if shift != 1:
            truth[14:18, 14:18, 6:8] = 4  # organ 4 absent from case 1's truth
        pred = np.zeros_like(truth)
        pred[2 + shift:10 + shift, 2:10, 1:5] = 1  # organ 1 shifted by `shift` voxels
        pred[12:20, 2:8, 1:4] = 2  # organ 2 loses a slice
        if shift != 2:
            pred[2:8, 14:22, 5:9] = 3  # organ 3 missed in case 2
        pred[14:18, 14:18, 6:8] = 4  # organ 4 predicted everywhere: a false positive in case 1
        cases.append((pred, truth))
    return cases, spacing


def test_per_organ_metrics_match_a_hand_computation() -> None:
    """Per class of a 4-organ label map: Dice by counting voxels, HD95 by scipy, the case counts, false
    positives (class predicted, absent from the truth) and missed organs, and the bootstrap intervals of the
    per-case values. Guards: classes mixed up, absent classes averaged in as 0 or 1, HD95 of a missed organ."""
    from medpipe.metrics.segmentation import per_label_rows, score_case, summarise

    cases, spacing = _organ_cases()
    names = {1: "lungs", 2: "heart", 3: "liver", 4: "spleen"}
    scored = [score_case(p, t, [1, 2, 3, 4], spacing) for p, t in cases]
    out = summarise(scored, names, seed=7, n_boot=500)["per_label"]
    assert list(out) == ["lungs", "heart", "liver", "spleen"]

    def dice(p: np.ndarray, t: np.ndarray) -> float:
        return 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())

    for k, name in names.items():
        dices = [dice(p == k, t == k) for p, t in cases if (t == k).any()]
        hds = [_reference_hd(p == k, t == k, spacing, 95) for p, t in cases if (t == k).any() and (p == k).any()]
        m = out[name]
        assert m["n"] == len(dices) and m["n_hd95"] == len(hds), name
        assert m["dice"] == pytest.approx(np.mean(dices), abs=1e-6), name
        assert m["hd95"] == pytest.approx(np.mean(hds), abs=1e-3), name
        assert m["dice_ci95"] == pytest.approx(list(bootstrap_ci(dices, seed=7, n=500)), abs=1e-6), name
        if len(hds) >= 2:
            assert m["hd95_ci95"] == pytest.approx(list(bootstrap_ci(hds, seed=7, n=500)), abs=1e-3), name
        else:
            assert m["hd95_ci95"] == [None, None], name
    # by hand: organ 1 shifted 0, 1, 2 of 8 voxels -> Dice 1, 7/8, 6/8; organ 2 keeps 3 of 4 slices -> 6/7
    assert out["lungs"]["dice"] == pytest.approx((1 + 7 / 8 + 6 / 8) / 3, abs=1e-6)
    assert out["heart"]["dice"] == pytest.approx(6 / 7, abs=1e-6)
    # organ 3 missed in case 2: Dice 0 counted, no HD95 for that case; organ 4 absent from case 1's truth
    assert out["liver"]["dice"] == pytest.approx(2 / 3, abs=1e-6) and out["liver"]["missed_cases"] == 1
    assert out["liver"]["n_hd95"] == 2
    assert out["spleen"]["n"] == 2 and out["spleen"]["dice"] == pytest.approx(1.0)
    assert out["spleen"]["false_positive_cases"] == 1 and out["lungs"]["false_positive_cases"] == 0
    rows = per_label_rows(out)
    assert [r["class"] for r in rows] == list(names.values())
    assert rows[2]["missed_cases"] == 1 and rows[3]["dice_ci95_low"] == pytest.approx(1.0)
