"""Classification metrics, bootstrap CIs and their figures, checked against scikit-learn and by hand."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medpipe.metrics.bootstrap import bootstrap_cases, bootstrap_ci
from medpipe.metrics.classification import (
    classification_metrics,
    confusion_matrix,
    metrics_with_ci,
    predict_labels,
    reliability,
    roc_auc,
    roc_curve,
)

skm = pytest.importorskip("sklearn.metrics")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_warnings() -> Iterator[None]:
    """Undefined metrics must come back as NaN silently: any warning (0/0, empty mean) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _problem(n: int, n_classes: int, seed: int, *, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative but imperfect probabilities; ``ties``: probabilities rounded to 0.1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.2
    p = _softmax(logits)
    if ties:
        if n_classes != 2:
            raise ValueError("ties only for binary problems")
        p1 = np.round(p[:, 1], 1)
        p = np.stack([1 - p1, p1], axis=1)
    return y, p


def _ece_reference(correct: np.ndarray, conf: np.ndarray, n_bins: int = 10) -> float:
    """Straight loop over the bins (k/M, (k+1)/M] of Guo et al. 2017."""
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if k else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            total += abs(correct[in_bin].mean() - conf[in_bin].mean()) * in_bin.mean()
    return total


# -- against scikit-learn ------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("positive", [0, 1])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_binary_metrics_match_sklearn(ties: bool, positive: int, threshold: float | None) -> None:
    y, p = _problem(300, 2, seed=11, ties=ties)
    if ties:
        assert np.unique(p[:, 1]).size < 12  # many tied scores indeed
    m = classification_metrics(y, p, positive=positive, threshold=threshold)
    assert set(m) == {"auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "ece", "n"}
    thr = 0.5 if threshold is None else threshold
    truth = y == positive
    pred = p[:, positive] >= thr
    assert m["n"] == 300
    assert m["auc"] == pytest.approx(skm.roc_auc_score(truth, p[:, positive]), abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(truth, pred), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(skm.recall_score(truth, pred), abs=1e-12)
    assert m["specificity"] == pytest.approx(skm.recall_score(~truth, ~pred), abs=1e-12)
    assert m["ppv"] == pytest.approx(skm.precision_score(truth, pred), abs=1e-12)
    assert m["npv"] == pytest.approx(skm.precision_score(~truth, ~pred), abs=1e-12)
    assert m["f1"] == pytest.approx(skm.f1_score(truth, pred), abs=1e-12)
    label = np.where(pred, positive, 1 - positive)
    conf = p[np.arange(300), label]
    assert m["ece"] == pytest.approx(_ece_reference(label == y, conf), abs=1e-12)
    assert reliability(y, p, positive=positive, threshold=threshold)["ece"] == pytest.approx(m["ece"], abs=1e-12)


def test_binary_auc_does_not_depend_on_the_threshold_and_flips_with_positive() -> None:
    y, p = _problem(120, 2, seed=5, ties=True)
    a = classification_metrics(y, p, threshold=0.2)["auc"]
    assert a == classification_metrics(y, p, threshold=0.8)["auc"]
    # the score of class 0 is 1 - score of class 1 and its positives are the other cases: same AUC
    assert classification_metrics(y, p, positive=0)["auc"] == pytest.approx(a, abs=1e-12)


def test_multiclass_metrics_match_sklearn() -> None:
    y, p = _problem(400, 4, seed=7)
    m = classification_metrics(y, p)
    assert set(m) == {"auc", "accuracy", "sensitivity", "specificity", "f1", "ece", "n"}
    pred = p.argmax(axis=1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    mcm = skm.multilabel_confusion_matrix(y, pred)  # per class [[TN, FP], [FN, TP]]
    spec = mcm[:, 0, 0] / (mcm[:, 0, 0] + mcm[:, 0, 1])
    assert m["specificity"] == pytest.approx(spec.mean(), abs=1e-12)
    assert m["ece"] == pytest.approx(_ece_reference(pred == y, p.max(axis=1)), abs=1e-12)
    assert reliability(y, p)["ece"] == pytest.approx(m["ece"], abs=1e-12)
    for k in range(4):
        assert roc_auc(y == k, p[:, k]) == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=1e-12)


def test_multiclass_macro_f1_with_a_class_never_seen_matches_sklearn() -> None:
    # class 3 neither true nor predicted: scikit-learn leaves it out of the macro F1, and so do we
    y, p = _problem(200, 3, seed=2)
    p4 = np.concatenate([p, np.zeros((200, 1))], axis=1)
    m = classification_metrics(y, p4)
    pred = p4.argmax(axis=1)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    # its one-vs-rest AUC is undefined: the macro AUC runs over the three others
    assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in range(3)]), abs=1e-12)


def test_confusion_matrix_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y, q = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    cm = confusion_matrix(y, q, 4)
    assert cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, q, labels=range(4)))
    np.testing.assert_array_equal(confusion_matrix([0, 0, 1], [1, 1, 1], 3), [[0, 2, 0], [0, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn(ties: bool) -> None:
    y, p = _problem(150, 2, seed=3, ties=ties)
    fpr, tpr, thr = roc_curve(y == 1, p[:, 1])
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(y == 1, p[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert thr[0] == math.inf
    np.testing.assert_allclose(thr[1:], ref_thr[1:], atol=0)
    # trapezoid area under the curve is the AUC (ties included)
    assert np.trapezoid(tpr, fpr) == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-12)


# -- by hand --------------------------------------------------------------------------------------------

def test_six_case_example_by_hand() -> None:
    # truth     0    0    0    1     1    1
    # score    .10  .40  .60  .35   .60  .90
    # AUC: pairs (positive, negative) where the positive scores higher, ties 1/2:
    #   .35 beats .10                    -> 1
    #   .60 beats .10, .40, ties .60     -> 2.5
    #   .90 beats all three              -> 3        AUC = 6.5 / 9
    # threshold .5: predicted positive = .60, .60, .90 -> TP 2 (.60, .90), FN 1 (.35), FP 1 (.60), TN 2
    #   sensitivity 2/3, specificity 2/3, PPV 2/3, NPV 2/3, F1 = 2*2 / (2*2 + 1 + 1) = 2/3, accuracy 4/6
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.10, 0.40, 0.60, 0.35, 0.60, 0.90])
    m = classification_metrics(y, np.stack([1 - s, s], axis=1))
    assert m["auc"] == pytest.approx(6.5 / 9)
    for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy"):
        assert m[k] == pytest.approx(2 / 3), k
    # with threshold .7 only .90 is positive: TP 1, FN 2, FP 0, TN 3
    m = classification_metrics(y, np.stack([1 - s, s], axis=1), threshold=0.7)
    assert (m["sensitivity"], m["specificity"], m["ppv"]) == pytest.approx((1 / 3, 1.0, 1.0))
    assert m["npv"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(6.5 / 9)


def test_ece_of_a_perfectly_calibrated_construction_is_zero() -> None:
    # three confidence levels; in each, exactly that fraction of the cases is predicted correctly
    ys, ss = [], []
    for conf, n_correct in ((0.55, 11), (0.75, 15), (0.95, 19)):
        ys += [1] * n_correct + [0] * (20 - n_correct)  # all predicted positive (score = conf >= 0.5)
        ss += [conf] * 20
    s = np.array(ss)
    m = classification_metrics(np.array(ys), np.stack([1 - s, s], axis=1))
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    # and a large sample drawn from calibrated probabilities has a small ECE
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), 20000)
    y = np.array([rng.choice(3, p=row) for row in p[:3000]])
    assert classification_metrics(y, p[:3000])["ece"] < 0.04


def test_ece_of_a_miscalibrated_case_by_hand() -> None:
    # 4 cases at confidence .95 with 3 correct (accuracy .75, gap .20),
    # 6 cases at confidence .65 with 3 correct (accuracy .50, gap .15):
    # ECE = .20 * 4/10 + .15 * 6/10 = .08 + .09 = .17
    probs = [[0.95, 0.05]] * 4 + [[0.35, 0.65]] * 6
    y = [0, 0, 0, 1] + [1, 1, 1, 0, 0, 0]
    m = classification_metrics(np.array(y), np.array(probs))
    assert m["ece"] == pytest.approx(0.17, abs=1e-12)
    rel = reliability(np.array(y), np.array(probs))
    assert rel["count"].tolist() == [0, 0, 0, 0, 0, 0, 6, 0, 0, 4]
    assert rel["accuracy"][9] == pytest.approx(0.75) and rel["accuracy"][6] == pytest.approx(0.5)
    assert rel["confidence"][9] == pytest.approx(0.95) and math.isnan(rel["confidence"][0])
    # multi-class: confidence .7 on every case, half of them right -> ECE .2
    p4 = np.tile([0.7, 0.1, 0.1, 0.1], (10, 1))
    assert classification_metrics(np.array([0] * 5 + [2] * 5), p4)["ece"] == pytest.approx(0.2, abs=1e-12)


# -- undefined metrics and validation ---------------------------------------------------------------------

def test_undefined_metrics_are_nan_not_errors() -> None:
    s = np.array([0.2, 0.7, 0.9])
    m = classification_metrics(np.array([1, 1, 1]), np.stack([1 - s, s], axis=1))
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["ppv"] == 1.0 and m["npv"] == 0.0
    # nothing predicted positive and no positives: PPV, sensitivity, F1 are 0/0
    m = classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]))
    assert all(math.isnan(m[k]) for k in ("auc", "sensitivity", "ppv", "f1"))
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    # multi-class with a single class present
    m = classification_metrics(np.zeros(5, dtype=int), _softmax(np.random.default_rng(0).normal(size=(5, 4))))
    assert math.isnan(m["auc"])
    # no cases at all
    m = classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)))
    assert m["n"] == 0 and all(math.isnan(v) for k, v in m.items() if k != "n")
    fpr, tpr, _ = roc_curve(np.array([1, 1]), np.array([0.3, 0.6]))
    assert np.isnan(fpr).all() and tpr[-1] == 1.0
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([0.3, 0.6])))


def test_invalid_inputs_raise_clear_errors() -> None:
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    with pytest.raises(ValueError, match="3 cases but prob has 2"):
        classification_metrics(np.array([0, 1, 1]), p[:2])
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        classification_metrics(np.array([0, 2, 1]), p)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        classification_metrics(np.array([0, -1, 1]), p)
    for bad in (np.nan, np.inf):
        q = p.copy()
        q[1, 0] = bad
        with pytest.raises(ValueError, match="non-finite"):
            classification_metrics(np.array([0, 1, 1]), q)
    with pytest.raises(ValueError, match="2-D"):
        classification_metrics(np.array([0, 1, 1]), p[:, 1])
    with pytest.raises(ValueError, match="integer"):
        classification_metrics(np.array([0, 0.5, 1]), p)
    with pytest.raises(ValueError, match="logits"):
        classification_metrics(np.array([0, 1, 1]), p * 3 - 1)
    with pytest.raises(ValueError, match="positive must be 0 or 1"):
        classification_metrics(np.array([0, 1, 1]), p, positive=2)
    with pytest.raises(ValueError, match="binary"):
        classification_metrics(np.array([0, 1, 2]), np.full((3, 3), 1 / 3), threshold=0.5)
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix([0, 1], [4, 1], 4)
    with pytest.raises(ValueError, match="same length"):
        roc_curve(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


# -- bootstrap ------------------------------------------------------------------------------------------

def test_metrics_with_ci_contain_the_estimate_and_are_seeded() -> None:
    y, p = _problem(156, 2, seed=21)
    r = metrics_with_ci(y, p, seed=4)
    point = classification_metrics(y, p)
    assert set(r) == set(point)
    for k, v in r.items():
        assert v["value"] == point[k]
        lo, hi = v["ci95"]
        assert lo <= v["value"] <= hi, k
    assert r["n"]["ci95"] == [156.0, 156.0]
    assert 0 < r["auc"]["ci95"][1] - r["auc"]["ci95"][0] < 0.3
    assert metrics_with_ci(y, p, seed=4) == r
    assert metrics_with_ci(y, p, seed=5)["auc"]["ci95"] != r["auc"]["ci95"]
    # the key stays ci95; a 50 % interval is narrower
    r50 = metrics_with_ci(y, p, seed=4, level=0.5)
    assert r50["auc"]["ci95"][0] > r["auc"]["ci95"][0] and r50["auc"]["ci95"][1] < r["auc"]["ci95"][1]


def test_metrics_with_ci_narrow_as_cases_grow() -> None:
    widths = {}
    for n in (80, 1200):
        y, p = _problem(n, 4, seed=8)
        r = metrics_with_ci(y, p, seed=0, n_boot=500)
        widths[n] = {k: v["ci95"][1] - v["ci95"][0] for k, v in r.items() if k != "n"}
    for k in widths[80]:
        assert widths[1200][k] < widths[80][k] / 2, k


@pytest.mark.parametrize("n_classes", [2, 4])
def test_vectorised_bootstrap_equals_recomputing_each_resample(n_classes: int) -> None:
    # few cases and a rare class: some resamples hold one class only (AUC undefined there)
    y, p = _problem(25, n_classes, seed=1)
    if n_classes == 2:
        y = (np.arange(25) < 3).astype(np.int64)  # 3 positives: ~4 % of resamples have none
    r = metrics_with_ci(y, p, seed=9, n_boot=300)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        return classification_metrics(y[idx], p[idx])

    ref = bootstrap_cases(statistic, y.size, seed=9, n=300)
    assert set(ref) == set(r)
    for k, v in r.items():
        assert v["ci95"] == pytest.approx(list(ref[k]), abs=1e-12), k


def test_bootstrap_cases_basics() -> None:
    values = np.random.default_rng(0).normal(size=40)

    def mean(idx: np.ndarray) -> dict[str, float]:
        return {"mean": float(values[idx].mean())}

    # the same resamples as bootstrap_ci
    assert bootstrap_cases(mean, 40, seed=3)["mean"] == bootstrap_ci(values, seed=3)
    # nothing to resample: undefined, not a zero-width interval
    assert all(math.isnan(x) for x in bootstrap_cases(mean, 40, seed=3, n=0)["mean"])
    assert all(math.isnan(x) for x in bootstrap_cases(lambda idx: {"v": float(values[idx].mean())}, 1, seed=3)["v"])

    # NaN values of a resample are ignored; a metric always NaN gives (nan, nan)
    def partly_nan(idx: np.ndarray) -> dict[str, float]:
        m = float(values[idx].mean())
        return {"m": m if m > 0 else math.nan, "never": math.nan}

    ci = bootstrap_cases(partly_nan, 40, seed=3, n=400)
    assert ci["m"][0] > 0 and all(math.isnan(x) for x in ci["never"])


def test_metrics_with_ci_handles_a_single_class_and_tiny_inputs() -> None:
    s = np.array([0.2, 0.7, 0.9, 0.4])
    r = metrics_with_ci(np.array([1, 1, 1, 1]), np.stack([1 - s, s], axis=1), n_boot=100)
    assert math.isnan(r["auc"]["value"]) and all(math.isnan(x) for x in r["auc"]["ci95"])
    r = metrics_with_ci(np.array([1]), np.array([[0.3, 0.7]]))
    assert r["accuracy"]["value"] == 1.0 and all(math.isnan(x) for x in r["accuracy"]["ci95"])  # one case: undefined


# -- figures --------------------------------------------------------------------------------------------

def _check_png(path: Path, min_kb: float = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_kb * 1024
    img = plt.imread(path)
    assert img.shape[:2] == (500, 500)
    assert img.std() > 0.01  # something is drawn
    assert not plt.get_fignums()  # every figure was closed
    assert not [q for q in path.parent.iterdir() if ".tmp" in q.name]  # atomic: no temporaries left


def test_classification_figures_are_valid_pngs(tmp_path: Path) -> None:
    from medpipe.report.classification_plots import (
        calibration_png,
        confusion_png,
        roc_png,
    )

    y2, p2 = _problem(150, 2, seed=1)
    roc_png(y2, p2, tmp_path / "roc_binary.png", class_names={0: "benign", 1: "malignant"}, positive=1,
            title="ROC", ci=(0.7, 0.9))
    _check_png(tmp_path / "roc_binary.png")
    y4, p4 = _problem(150, 4, seed=1)
    roc_png(y4, p4, tmp_path / "roc_multi.png", class_names={0: "a", 1: "b", 2: "c", 3: "d"}, positive=None,
            title="ROC one-vs-rest", ci=None)
    _check_png(tmp_path / "roc_multi.png")
    out = confusion_png(y4, p4.argmax(axis=1), 4, tmp_path / "sub" / "confusion.png",
                        class_names={0: "a", 1: "b", 2: "c", 3: "d"}, title="Confusion")
    assert out == tmp_path / "sub" / "confusion.png"
    _check_png(out)
    calibration_png(y4, p4, tmp_path / "calibration.png", title="Calibration")
    _check_png(tmp_path / "calibration.png")
    # degenerate inputs still give a figure (AUC n/a, empty rows)
    roc_png(np.ones(3, dtype=int), p2[:3], tmp_path / "roc_one_class.png", class_names=None, positive=None,
            title="one class", ci=None)
    _check_png(tmp_path / "roc_one_class.png", min_kb=4)


# -- choosing a decision threshold on held-out predictions -------------------------------------------------------


def _binary(scores: list[float], truth: list[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    return np.asarray(truth), np.stack([1 - s, s], axis=1)


def test_choose_threshold_for_accuracy_takes_the_middle_of_the_best_plateau() -> None:
    from medpipe.metrics.classification import choose_threshold

    # positives from 0.55 up; one negative at 0.6 cannot be separated: the best cut is between 0.4 and 0.55
    y, p = _binary([0.1, 0.2, 0.3, 0.4, 0.55, 0.6, 0.7, 0.8, 0.6], [0, 0, 0, 0, 1, 1, 1, 1, 0])
    t = choose_threshold(y, p, rule="accuracy")
    assert t == pytest.approx((0.4 + 0.55) / 2)
    # a tie between two equally good cuts: the median of them
    y, p = _binary([0.1, 0.3, 0.5, 0.7], [0, 1, 0, 1])
    assert choose_threshold(y, p, rule="accuracy") == pytest.approx(np.median([0.2, 0.4, 0.6]))


def test_choose_threshold_youden_balances_the_classes_and_positive_flips_the_score() -> None:
    from medpipe.metrics.classification import choose_threshold

    # 2 positives, 8 negatives; accuracy prefers calling one positive negative, Youden's J does not
    y, p = _binary([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.5, 0.45, 0.9], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    t_acc = choose_threshold(y, p, rule="accuracy")
    t_j = choose_threshold(y, p, rule="youden")
    assert t_acc > 0.5 > t_j >= 0.4
    # the same data with class 0 as positive: the threshold is on the other probability
    t0 = choose_threshold(y, p, positive=0, rule="youden")
    assert t0 == pytest.approx(1 - t_j)


@pytest.mark.parametrize(("y", "prob", "rule", "message"), [
    ([0, 0], [[0.6, 0.4], [0.3, 0.7]], "accuracy", "both classes"),
    ([0, 1], [[0.6, 0.4], [0.3, 0.7]], "f1", "unknown threshold rule"),
    ([0, 1, 2], [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]], "accuracy", "binary problems"),
])
def test_choose_threshold_refuses(y: list[int], prob: list[list[float]], rule: str, message: str) -> None:
    from medpipe.metrics.classification import choose_threshold

    with pytest.raises(ValueError, match=message):
        choose_threshold(np.asarray(y), np.asarray(prob), rule=rule)


def test_confusion_matrix_and_predict_labels_errors_name_the_argument() -> None:
    """Each error says which argument is wrong and why (mutation testing found these messages unchecked)."""
    assert confusion_matrix([0, 0], [0, 0], 1).tolist() == [[2]]  # one class is a valid (1, 1) matrix
    with pytest.raises(ValueError, match="n_classes must be >= 1, not 0"):
        confusion_matrix([0], [0], 0)
    with pytest.raises(ValueError, match="^y_true must hold integer class labels"):
        confusion_matrix([0.5, 1.0], [0, 1], 2)
    with pytest.raises(ValueError, match="^y_pred must hold integer class labels"):
        confusion_matrix([0, 1], [0.5, 1.0], 2)
    with pytest.raises(ValueError, match="^y_true has 2 cases but y_pred has 3$"):
        confusion_matrix([0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match=r"^prob must be a 2-D array \(cases, classes >= 2\), got shape \(3,\)$"):
        predict_labels([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"got shape \(3, 1\)$"):
        predict_labels([[0.1], [0.2], [0.3]])
    # probabilities given as integers or strings of numbers are read as float64
    assert predict_labels([[1, 0], [0, 1]]).tolist() == [0, 1]
    assert predict_labels(np.array([["0.3", "0.7"], ["0.6", "0.4"]])).tolist() == [1, 0]


# -- found by mutation testing (benchmarks/mutation.py): each test names the slip it guards -------------------

def test_check_inputs_messages_name_the_argument_and_the_count() -> None:
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [0.1, 0.9]])
    y = np.array([0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"^prob must have at least 2 class columns, got 1$"):
        classification_metrics(y, p[:, :1])
    q = p.copy()
    q[2] = np.nan
    q[3, 1] = np.inf  # two bad cases, one with a finite value left: the count is of cases, not of values
    with pytest.raises(ValueError, match=r"^prob has non-finite values \(NaN or inf\) in 2 case\(s\)$"):
        classification_metrics(y, q)
    with pytest.raises(ValueError, match=r"^prob must be numeric, got dtype <U\d+$"):
        classification_metrics(y, p.astype(str))
    with pytest.raises(ValueError, match=r"^y_true has labels outside 0\.\.1: \[-1, 2\]$"):
        classification_metrics(np.array([0, 2, -1, 1]), p)  # label 0 is valid and must not be listed
    with pytest.raises(ValueError, match=r"^y_true has labels outside 0\.\.1: \[2, 3, 4, 5, 6, 7, 8, 9, 10, 11\]$"):
        confusion_matrix(list(range(2, 14)), [0] * 12, 2)  # at most 10 bad labels listed
    with pytest.raises(ValueError, match=r"^y_true has 2 cases but prob has 3$"):  # rows, not columns (4)
        classification_metrics(np.array([0, 1]), np.full((3, 4), 1 / 4))
    with pytest.raises(ValueError, match=r"^y_true must be a 1-D array of class labels, got shape \(4, 1\)$"):
        classification_metrics(y[:, None], p)
    with pytest.raises(ValueError, match=r"^y_true must hold integer class labels, got dtype <U\d+$"):
        classification_metrics(y.astype(str), p)
    with pytest.raises(ValueError, match=r"^threshold must not be NaN$"):
        classification_metrics(y, p, threshold=math.nan)


def test_check_inputs_range_is_tested_on_each_side_with_its_tolerance() -> None:
    y = np.array([0, 1])
    # above 1 alone (or below 0 alone) is refused: the slip `min < 0 and max > 1` needs both
    with pytest.raises(ValueError, match=r"got values in \[0\.2, 1\.2\] \(logits instead of softmax outputs\?\)$"):
        classification_metrics(y, np.array([[0.2, 1.2], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"got values in \[-0\.2, 0\.8\]"):
        classification_metrics(y, np.array([[-0.2, 0.8], [0.5, 0.5]]))
    # float32 softmax rounding: exactly the tolerance on either side is accepted
    ok = classification_metrics(y, np.array([[1 + 1e-4, -1e-4], [0.3, 0.7]]))
    assert ok["accuracy"] == 1.0


def test_probabilities_and_labels_of_every_numeric_dtype_give_the_same_metrics() -> None:
    y = np.array([0, 1, 1, 0])
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    ref = classification_metrics(y, p)
    assert ref["accuracy"] == 0.5 and ref["sensitivity"] == 0.5
    for prob in (p.astype(np.float32), p.astype(np.int64), p.astype(bool)):
        assert classification_metrics(y, prob) == ref, prob.dtype
    for labels in (y.astype(np.float64), y.astype(np.float32), y.astype(bool)):  # integral float labels are read
        assert classification_metrics(labels, p) == ref, labels.dtype


def test_binary_inputs_errors_and_dtypes() -> None:
    with pytest.raises(ValueError, match=r"^score has non-finite values \(NaN or inf\)$"):
        roc_auc(np.array([0, 1]), np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match=r"^y_true_binary has labels outside 0\.\.1: \[2\]$"):
        roc_curve(np.array([0, 2]), np.array([0.2, 0.3]))  # labels are binary: 2 is not "positive"
    # a hard classifier's 0/1 predictions as the score: read as float, not negated as bool
    fpr, tpr, thr = roc_curve(np.array([0, 1, 1]), np.array([False, True, False]))
    assert fpr.tolist() == [0.0, 0.0, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0] and thr.tolist() == [math.inf, 1.0, 0.0]


def test_roc_curve_of_no_cases_is_the_origin_only() -> None:
    fpr, tpr, thr = roc_curve(np.zeros(0, dtype=int), np.zeros(0))
    assert np.isnan(fpr).all() and np.isnan(tpr).all() and fpr.shape == tpr.shape == (1,)
    assert thr.tolist() == [math.inf]


def test_reliability_of_three_classes_by_hand() -> None:
    y = np.array([0, 1, 2, 0])  # the last case is predicted 2: wrong
    p = np.array([[0.5, 0.3, 0.2], [0.2, 0.4, 0.4 - 1e-9], [0.1, 0.45, 0.45 + 1e-9], [0.3, 0.3, 0.4]])
    r = reliability(y, p)  # every confidence <= 0.5: the upper bins are empty but present
    assert r["count"].tolist() == [0, 0, 0, 2, 2, 0, 0, 0, 0, 0] and r["count"].dtype == np.int64
    np.testing.assert_allclose(r["confidences"], [0.5, 0.4, 0.45 + 1e-9, 0.4])
    assert r["accuracy"][3] == 0.5 and r["accuracy"][4] == 1.0 and np.isnan(r["accuracy"][9])
    # bin (0.3, 0.4]: |1 correct - 0.8 confidence|; bin (0.4, 0.5]: |2 - 0.95|; over 4 cases
    assert r["ece"] == pytest.approx((0.2 + 1.05 - 1e-9) / 4)
    assert r["ece"] == pytest.approx(classification_metrics(y, p)["ece"])
    one = reliability(y, p, n_bins=1)  # one bin: |accuracy - mean confidence|
    assert one["count"].tolist() == [4] and one["ece"] == pytest.approx(abs(3 / 4 - (1.75 + 1e-9) / 4))
    with pytest.raises(ValueError, match=r"^n_bins must be >= 1, not 0$"):
        reliability(y, p, n_bins=0)
    empty = reliability(np.zeros(0, dtype=int), np.zeros((0, 3)))
    assert math.isnan(empty["ece"]) and empty["count"].tolist() == [0] * 10


def test_metrics_with_ci_apply_positive_and_threshold_to_value_and_interval() -> None:
    s = np.array([0.1, 0.2, 0.15, 0.35, 0.4, 0.45])
    y, p = np.array([0, 0, 0, 1, 1, 1]), np.stack([1 - s, s], axis=1)
    # separable at 0.3 (every resample too), not at the default 0.5
    r = metrics_with_ci(y, p, threshold=0.3, n_boot=200)
    assert r["sensitivity"]["value"] == 1.0 and r["sensitivity"]["ci95"] == [1.0, 1.0]
    assert r["specificity"]["ci95"] == [1.0, 1.0]
    # class 0 positive, threshold on prob[:, 0]: separable at 0.7
    r0 = metrics_with_ci(y, p, positive=0, threshold=0.7, n_boot=200)
    assert r0["sensitivity"]["value"] == 1.0 and r0["sensitivity"]["ci95"] == [1.0, 1.0]
    assert r0["ppv"]["value"] == 1.0


def test_metrics_with_ci_defaults_are_seed_0_and_2000_resamples() -> None:
    y, p = _problem(40, 2, seed=3)
    assert metrics_with_ci(y, p) == metrics_with_ci(y, p, seed=0, n_boot=2000)


def test_choose_threshold_edges_of_the_candidate_list() -> None:
    from medpipe.metrics.classification import choose_threshold

    # one negative on top: the best cut is below the lowest score, half of it (and one negative is enough)
    y, p = _binary([0.2, 0.4, 0.6, 0.8], [1, 1, 1, 0])
    assert choose_threshold(y, p) == pytest.approx(0.1)  # the default rule is accuracy
    assert choose_threshold(y, p, rule="accuracy") == choose_threshold(y, p)
    # one positive at the bottom: the best cut is above the highest score, halfway to 1
    y, p = _binary([0.2, 0.4, 0.6, 0.8], [1, 0, 0, 0])
    assert choose_threshold(y, p) == pytest.approx(0.9)
    # cuts at 0 and at 1 are never candidates (the result lies strictly inside (0, 1))
    y, p = _binary([0.0, 0.0, 0.5], [1, 1, 0])
    assert choose_threshold(y, p) == 0.75
    y, p = _binary([0.5, 1.0], [0, 1])
    assert choose_threshold(y, p) == 0.75
    # scores only at 0 and 1 leave the one candidate 0.5
    assert choose_threshold(*_binary([1.0, 0.0, 1.0], [0, 1, 1]), rule="youden") == 0.5
    # scores a rounding step outside [0, 1] are read as 0 and 1
    y, p = _binary([-1e-5, 0.6], [0, 1])
    assert choose_threshold(y, p) == 0.3
    y, p = _binary([0.4, 1 + 1e-5], [0, 1])
    assert choose_threshold(y, p) == (0.4 + 1.0) / 2
    with pytest.raises(ValueError, match=r"^choosing a threshold needs cases of both classes$"):
        choose_threshold(*_binary([0.2, 0.4], [1, 1]))
    with pytest.raises(ValueError, match=r"known: accuracy, youden$"):
        choose_threshold(*_binary([0.2, 0.4], [0, 1]), rule="f1")
