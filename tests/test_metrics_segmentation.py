"""Segmentation metrics against independent computations (each test names the planted bug it catches)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medpipe.metrics.bootstrap import bootstrap_ci
from medpipe.metrics.segmentation import CaseScores, dice_hd95


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
    from medpipe.metrics.segmentation import PER_LABEL_COLUMNS, per_label_rows, score_case, summarise

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
    # the CSV columns, each from its own field (low and high not swapped: the lungs' interval has a width)
    for r, m in zip(rows, out.values(), strict=True):
        assert tuple(r) == PER_LABEL_COLUMNS
        assert (r["n"], r["dice"], r["n_hd95"], r["hd95_mm"]) == (m["n"], m["dice"], m["n_hd95"], m["hd95"])
        assert [r["dice_ci95_low"], r["dice_ci95_high"]] == m["dice_ci95"]
        assert [r["hd95_ci95_low"], r["hd95_ci95_high"]] == m["hd95_ci95"]
        assert (r["false_positive_cases"], r["missed_cases"]) == (m["false_positive_cases"], m["missed_cases"])
    assert rows[0]["dice_ci95_low"] < rows[0]["dice_ci95_high"] and rows[0]["hd95_ci95_low"] < rows[0]["hd95_ci95_high"]
    # HD95 intervals are rounded to 3 decimals like HD95 itself; n_boot is passed on (not the default 2000)
    lo, hi = bootstrap_ci(_case_hd95s(scored, 1), seed=7, n=500)
    assert out["lungs"]["hd95_ci95"] == [round(lo, 3), round(hi, 3)]
    # false positives and misses come from the Dice (NaN: class absent from the truth), not from HD95, which
    # is NaN for every case when it is not computed
    quick = summarise([score_case(p, t, [1, 2, 3, 4], spacing, hd95=False) for p, t in cases], names, seed=7,
                      n_boot=50)["per_label"]
    assert [q["false_positive_cases"] for q in quick.values()] == [m["false_positive_cases"] for m in out.values()]


def _case_hd95s(scored: list[CaseScores], k: int) -> list[float]:
    return [c.per_class[k][1] for c in scored if not math.isnan(c.per_class[k][1])]


def test_validation_case_and_combine_by_hand() -> None:
    """Guards: the per-case mean over the wrong classes, empty-truth cases averaged in, the empty fallback."""
    import torch

    from medpipe.metrics.segmentation import combine_validation_dice, validation_case

    def prob(labels: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([labels]), 3).permute(0, 2, 1).float()

    truth = torch.tensor([[[1, 1, 2, 0]]])
    # class 1: predicted at 1 voxel of its 2 -> 2/3; class 2: predicted at 2 voxels, 1 right -> 2/3
    assert validation_case(prob([1, 0, 2, 2]), truth, 3) == (pytest.approx(2 / 3), None)
    empty = torch.zeros((1, 1, 4), dtype=torch.long)
    assert validation_case(prob([0, 0, 0, 0]), empty, 3) == (None, 1.0)
    assert validation_case(prob([0, 1, 0, 0]), empty, 3) == (None, 0.0)  # class 1 counts as foreground
    soft = torch.tensor([[[0.9, 0.8, 0.95, 0.7], [0.05, 0.1, 0.03, 0.2], [0.05, 0.1, 0.02, 0.1]]])
    assert validation_case(soft, empty, 3) == (None, 1.0)  # arg-max over the classes: all background
    assert combine_validation_dice([(0.5, None), (None, 1.0), (1.0, None)]) == 0.75  # empty cases left out
    assert combine_validation_dice([(None, 1.0), (None, 0.0), (None, 1.0)]) == pytest.approx(2 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cases: NaN without a mean of nothing
        assert math.isnan(combine_validation_dice([]))


def test_summarise_rounds_the_hd95_interval_and_uses_n_boot() -> None:
    from medpipe.metrics.segmentation import summarise

    hds = [1 / 3, 2 / 7, 5 / 11, 1 / 13, 7 / 9, 3 / 17, 9 / 19, 4 / 23]
    cases = [_case(0.5, h) for h in hds]
    got = summarise(cases, {1: "a"}, seed=3, n_boot=300)["per_label"]["a"]["hd95_ci95"]
    assert got == [round(x, 3) for x in bootstrap_ci(hds, seed=3, n=300)]
    assert got != [round(x, 3) for x in bootstrap_ci(hds, seed=3, n=2000)]


# -- the rest of the module, case by case (the tests mutation testing found missing) -------------------------


def test_dice_hd95_undefined_values_and_hd95_off() -> None:
    truth = np.zeros((6, 6, 4), np.uint8)
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels of class 1; class 2 absent from the truth
    pred = np.zeros_like(truth)
    pred[1:3, 1:3, 1:2] = 1  # 4 of them
    pred[4, 4, 3] = 2  # a false positive of class 2
    out = dice_hd95(pred, truth, [1, 2, 3], (1.0, 1.0, 1.0))
    assert out[1][0] == pytest.approx(2 * 4 / (4 + 8)) and out[1][1] == pytest.approx(1.0)
    assert math.isnan(out[2][0]) and math.isnan(out[2][1])  # truth lacks class 2: both undefined
    assert math.isnan(out[3][0]) and math.isnan(out[3][1])
    missed = dice_hd95(np.zeros_like(truth), truth, [1], (1.0, 1.0, 1.0))[1]
    assert missed[0] == 0.0 and math.isnan(missed[1])  # predicted nothing: Dice 0, no surface to measure
    off = dice_hd95(pred, truth, [1], (1.0, 1.0, 1.0), hd95=False)[1]
    assert off[0] == pytest.approx(2 / 3) and math.isnan(off[1])


def test_format_ci() -> None:
    from medpipe.metrics.segmentation import format_ci

    undefined = "undefined (fewer than 2 cases)"
    assert format_ci(None) == undefined
    assert format_ci((math.nan, 0.5)) == undefined and format_ci((0.5, math.nan)) == undefined
    assert format_ci((None, 0.5)) == undefined and format_ci([0.5, None]) == undefined
    assert format_ci((0.12345, 0.67891)) == "[0.123, 0.679]"
    assert format_ci((1, 2)) == "[1.000, 2.000]"
    assert format_ci((np.float32(0.25), np.float64(0.5))) == "[0.250, 0.500]"


def test_finite_or_none_and_nanmean() -> None:
    from medpipe.metrics.segmentation import finite_or_none, nanmean

    assert finite_or_none(None) is None and finite_or_none(math.nan) is None
    assert finite_or_none(math.inf) is None and finite_or_none(-math.inf) is None
    assert finite_or_none(0.123456789) == 0.123457 and finite_or_none(12.34567, 3) == 12.346
    v = finite_or_none(np.float32(0.5))
    assert v == 0.5 and type(v) is float
    assert nanmean([1.0, math.nan, 4.0]) == 2.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined without numpy's "mean of empty slice" warning
        assert math.isnan(nanmean([])) and math.isnan(nanmean([math.nan]))


def test_score_case_by_hand() -> None:
    from medpipe.metrics.segmentation import score_case

    truth = np.zeros((8, 8, 4), np.uint8)
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels
    truth[5:7, 5:7, 1:3] = 2  # 8 voxels
    pred = truth.copy()
    pred[5:7, 5:7, 1:3] = 1  # class 2 called class 1: per class wrong, whole foreground right
    spacing = (0.5, 2.0, 3.0)  # 3 mm^3 per voxel
    s = score_case(pred, truth, [1, 2], spacing)
    assert s.per_class[1][0] == pytest.approx(2 * 8 / (16 + 8)) and s.per_class[2][0] == 0.0
    assert s.whole == (pytest.approx(1.0), pytest.approx(0.0))
    assert s.truth_has and s.pred_has
    assert s.truth_ml == pytest.approx(16 * 3 / 1000) and s.pred_ml == pytest.approx(16 * 3 / 1000)
    # hd95=False: Dice only, for every class and for the whole foreground
    quick = score_case(pred, truth, [1, 2], spacing, hd95=False)
    assert quick.per_class[1][0] == s.per_class[1][0] and math.isnan(quick.per_class[1][1])
    assert quick.whole[0] == pytest.approx(1.0) and math.isnan(quick.whole[1])
    # one class: the whole foreground is that class
    one = score_case(pred, truth, [1], spacing)
    assert one.whole == one.per_class[1]
    # the whole foreground is 1 everywhere the class map is > 0 (not == 1)
    one_ml = score_case(np.zeros_like(truth), truth, [2], spacing, hd95=False)
    assert not one_ml.pred_has and one_ml.pred_ml == 0.0 and one_ml.truth_ml == pytest.approx(0.048)
    empty = score_case(np.zeros_like(truth), np.zeros_like(truth), [1, 2], spacing)
    assert not empty.truth_has and not empty.pred_has and math.isnan(empty.whole[0])


def _case(dice: float, hd: float, truth: bool = True, pred: bool = True,
          per_class: dict[int, tuple[float, float]] | None = None) -> CaseScores:
    return CaseScores(per_class or {1: (dice, hd)}, (dice, hd), truth, pred, 1.0, 1.0)


def test_summarise_by_hand() -> None:
    from medpipe.metrics.segmentation import summarise

    nan = math.nan
    cases = [
        _case(0.8, 2.0, per_class={1: (0.8, 2.0), 2: (0.6, 4.0)}),
        _case(0.6, 4.0, per_class={1: (0.4, 1.0), 2: (nan, nan)}),
        _case(0.0, nan, pred=False, per_class={1: (0.0, nan), 2: (nan, nan)}),  # a missed tumour
        _case(nan, nan, truth=False, pred=True, per_class={1: (nan, nan), 2: (nan, nan)}),  # false positive
        _case(nan, nan, truth=False, pred=False, per_class={1: (nan, nan), 2: (nan, nan)}),  # correctly empty
        _case(1.0, 1.0, per_class={1: (1.0, 1.0), 2: (0.2, 6.0)}),
        _case(nan, nan, truth=False, pred=True, per_class={1: (nan, nan), 2: (nan, nan)}),  # false positive
    ]
    m = summarise(cases, {1: "a", 2: "b"}, seed=3, n_boot=200)
    assert m["dice"] == pytest.approx((0.8 + 0.6 + 0.0 + 1.0) / 4)
    assert m["hd95"] == pytest.approx((2.0 + 4.0 + 1.0) / 3, abs=5e-4)
    # every case: tumour cases by their Dice, tumour-free ones 1 if predicted empty else 0
    assert m["dice_all_cases"] == pytest.approx((0.8 + 0.6 + 0.0 + 0.0 + 1.0 + 1.0 + 0.0) / 7)
    assert (m["n_cases"], m["n_with_tumour"], m["false_positive_cases"], m["missed_tumours"]) == (7, 4, 2, 1)
    assert m["dice_ci95"] == pytest.approx(list(bootstrap_ci([0.8, 0.6, 0.0, 1.0], seed=3, n=200)), abs=1e-6)
    assert m["hd95_ci95"] == pytest.approx(list(bootstrap_ci([2.0, 4.0, 1.0], seed=3, n=200)), abs=1e-3)
    a, b = m["per_label"]["a"], m["per_label"]["b"]
    assert a["dice"] == pytest.approx((0.8 + 0.4 + 0.0 + 1.0) / 4) and a["n"] == 4
    assert a["hd95"] == pytest.approx((2.0 + 1.0 + 1.0) / 3, abs=5e-4)
    assert a["dice_ci95"] == pytest.approx(list(bootstrap_ci([0.8, 0.4, 0.0, 1.0], seed=3, n=200)), abs=1e-6)
    assert b["dice"] == pytest.approx(0.4) and b["n"] == 2 and b["hd95"] == pytest.approx(5.0)
    # rounding for JSON: 6 places for Dice, 3 for HD95 (mm)
    r = summarise([_case(1 / 3, 1 / 3), _case(1 / 3, 1 / 3)], {1: "a"}, seed=0, n_boot=10)
    assert r["dice"] == 0.333333 and r["hd95"] == 0.333 and r["per_label"]["a"]["hd95"] == 0.333
    assert r["dice_ci95"] == [0.333333, 0.333333] and r["hd95_ci95"] == [0.333, 0.333]
    # one case: means defined, intervals undefined (None), never zero-width
    one = summarise([_case(0.5, 2.0)], {1: "a"}, seed=0, n_boot=10)
    assert one["dice"] == 0.5 and one["dice_ci95"] == [None, None] and one["hd95_ci95"] == [None, None]
    assert one["per_label"]["a"]["dice_ci95"] == [None, None]


def test_crossval_summary_pools_cases_and_keeps_each_fold() -> None:
    from medpipe.metrics.segmentation import crossval_summary, summarise

    fold1 = [_case(0.9, 1.0), _case(0.7, 3.0)]
    fold2 = [_case(0.5, 2.0), _case(0.3, 6.0), _case(math.nan, math.nan, truth=False, pred=True)]
    fold3 = [_case(math.nan, math.nan, truth=False, pred=False)]  # no tumour: its Dice is undefined
    s = crossval_summary([fold1, fold2, fold3], {1: "a"}, seed=1, n_boot=100)
    pooled = summarise(fold1 + fold2 + fold3, {1: "a"}, seed=1, n_boot=100)
    assert s["pooled"] == pooled and s["folds"][0] == summarise(fold1, {1: "a"}, seed=1, n_boot=100)
    assert s["cv_dice"] == pytest.approx(0.6) and s["cv_dice_ci95"] == pooled["dice_ci95"]
    assert s["cv_hd95"] == pytest.approx(3.0) and s["cv_hd95_ci95"] == pooled["hd95_ci95"]
    assert s["cv_dice_folds"] == [pytest.approx(0.8), pytest.approx(0.4), None]
    assert s["cv_dice_mean"] == pytest.approx(0.6)
    assert s["cv_dice_sd"] == pytest.approx(math.sqrt(((0.8 - 0.6) ** 2 + (0.4 - 0.6) ** 2) / 1), abs=1e-6)  # ddof=1
    assert (s["cv_n_cases"], s["cv_n_with_tumour"]) == (6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined is None, without numpy's empty-mean / ddof warnings
        one = crossval_summary([fold1, fold3], {1: "a"}, seed=1, n_boot=100)
        none = crossval_summary([fold3], {1: "a"}, seed=1, n_boot=100)
    assert one["cv_dice_mean"] == pytest.approx(0.8) and one["cv_dice_sd"] is None
    assert none["cv_dice_mean"] is None and none["cv_dice_sd"] is None and none["cv_dice_folds"] == [None]
    # the default number of resamples is 2000: the interval is that of summarise with 2000 (values spread
    # enough that one resample more moves the quantiles)
    rng = np.random.default_rng(0)
    many = [_case(float(d), 1.0) for d in rng.uniform(0.3, 0.95, size=15)]
    default = crossval_summary([many[:8], many[8:]], {1: "a"}, seed=1)
    assert default["cv_dice_ci95"] == summarise(many, {1: "a"}, seed=1, n_boot=2000)["dice_ci95"]
    assert default["cv_dice_ci95"] != summarise(many, {1: "a"}, seed=1, n_boot=2001)["dice_ci95"]


def test_foreground_dice_and_validation_dice_by_hand() -> None:
    import torch

    from medpipe.metrics.segmentation import foreground_dice, validation_dice

    truth = torch.zeros(1, 1, 4, 4, 2, dtype=torch.long)
    truth[0, 0, :2, :2, 0] = 1  # 4 voxels of class 1, no class 2
    pred = torch.zeros(1, 4, 4, 2, dtype=torch.long)
    pred[0, :2, :1, 0] = 1  # 2 of them
    pred[0, 3, 3, 1] = 2

    def prob(labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
        p = torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float()
        return p * 0.8 + 0.2 / classes  # argmax is still the label

    d = foreground_dice(prob(pred), truth, 3)
    assert len(d) == 2 and d[0] == pytest.approx(2 * 2 / (2 + 4)) and math.isnan(d[1])
    # the per-case mean over the classes the truth has, averaged over cases
    truth2 = torch.zeros_like(truth)
    truth2[0, 0, 2:, 2:, :] = 2  # 8 voxels of class 2
    pred2 = truth2[:, 0].clone()
    pred2[0, 2, 2, 0] = 1
    d2 = foreground_dice(prob(pred2), truth2, 3)
    assert math.isnan(d2[0]) and d2[1] == pytest.approx(2 * 7 / (7 + 8))
    cases = [(prob(pred), truth), (prob(pred2), truth2)]
    assert validation_dice(cases, 3) == pytest.approx((2 / 3 + 14 / 15) / 2)
    # tumour-free cases do not lower the mean while some case has a tumour ...
    empty = torch.zeros_like(truth)
    assert validation_dice([*cases, (prob(empty[:, 0]), empty)], 3) == pytest.approx((2 / 3 + 14 / 15) / 2)
    # ... and without any, the score is the fraction predicted empty
    assert validation_dice([(prob(empty[:, 0]), empty), (prob(pred), empty), (prob(empty[:, 0]), empty)],
                           3) == pytest.approx(2 / 3)
    assert validation_dice([(prob(pred), empty)], 3) == 0.0
    # predicted empty with a confidence that varies over the volume: still empty (argmax over the classes)
    bg = torch.from_numpy(np.random.default_rng(0).uniform(0.6, 0.9, size=(1, 4, 4, 2))).float()
    varying = torch.stack([bg, (1 - bg) / 2, (1 - bg) / 2], dim=1)
    assert validation_dice([(varying, empty)], 3) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN without numpy's "mean of empty slice" warning
        assert math.isnan(validation_dice([], 3))


def test_validation_loss_of_a_case_without_foreground() -> None:
    """The one-hot truth has every class, also those the case lacks (guards inferring the number of classes
    from the labels present, which would silently broadcast one channel over all)."""
    import torch

    from medpipe.metrics.segmentation import validation_loss

    truth = torch.zeros(1, 1, 4, 4, 2, dtype=torch.long)
    prob = torch.stack([torch.full((1, 4, 4, 2), 0.9), torch.full((1, 4, 4, 2), 0.1)], dim=1)
    n, eps = 32, 1e-5
    dice_bg = 1 - (2 * 0.9 * n + eps) / (0.9 * n + n + eps)
    dice_fg = 1 - eps / (0.1 * n + eps)  # nothing to overlap: the foreground's soft Dice loss is ~1
    expected = (dice_bg + dice_fg) / 2 - math.log(0.9)
    assert validation_loss(prob, truth, 2) == pytest.approx(expected, rel=1e-5)
    # certain and right: zero loss; the smoothing terms make the absent class's Dice 1 (not 0/0 or -1)
    certain = torch.stack([torch.ones(1, 4, 4, 2), torch.zeros(1, 4, 4, 2)], dim=1)
    assert validation_loss(certain, truth, 2) == pytest.approx(0.0, abs=1e-6)
