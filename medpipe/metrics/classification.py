"""Binary and multi-class classification metrics, with bootstrap confidence intervals (pure numpy).

Inputs are integer labels ``y_true`` (N,) in ``0..C-1`` and class probabilities ``prob`` (N, C).

Binary (C == 2): the score is ``prob[:, positive]`` (``positive`` defaults to 1) and a case is predicted
positive when ``score >= threshold`` (default 0.5); accuracy, sensitivity, ... all use that prediction.
``auc`` is the ROC AUC of the score (Mann-Whitney, ties counting 1/2).

Multi-class (C > 2): the prediction is the arg-max class; ``auc`` is the macro average of the
one-vs-rest AUCs, ``sensitivity`` the macro recall (balanced accuracy), ``specificity`` the macro
TN / (TN + FP), ``f1`` the macro F1. A macro average runs over the classes where the per-class value is
defined (recall: classes present in ``y_true``; F1: classes present in ``y_true`` or predicted, as
scikit-learn does); it is NaN when none is.

``ece`` is the expected calibration error (Guo et al. 2017) of the confidence of the predicted label,
``prob[i, pred_i]``, with equal-width bins ``(k/M, (k+1)/M]`` (a confidence of 0 goes in the first)::

    ECE = sum over bins of |accuracy(bin) - mean confidence(bin)| * (cases in bin) / N

An undefined metric (a 0/0, an AUC with one class present) is NaN, never an exception.

Every metric is computed from per-case *weights* (how many times each case is counted), so the point
estimate (all weights 1) and a bootstrap resample (multiplicities of the drawn cases) go through the same
code; ``metrics_with_ci`` evaluates all resamples of a block at once as matrix operations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medpipe.metrics.bootstrap import bootstrap_cases

__all__ = [
    "DEFAULT_THRESHOLD",
    "ECE_BINS",
    "THRESHOLD_RULES",
    "check_inputs",
    "choose_threshold",
    "classification_metrics",
    "confusion_matrix",
    "metrics_with_ci",
    "predict_labels",
    "reliability",
    "roc_auc",
    "roc_curve",
]

DEFAULT_THRESHOLD = 0.5
ECE_BINS = 10

#: probabilities may stray this far outside [0, 1] (float32 softmax rounding) before they are refused
_PROB_TOLERANCE = 1e-4


# -- validation -----------------------------------------------------------------------------------------

def check_inputs(y_true: ArrayLike, prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``y_true`` as int64 (N,) and ``prob`` as float64 (N, C).

    Raises ValueError when ``prob`` is not 2-D with at least 2 columns, holds non-finite values or values
    outside [0, 1], when ``y_true`` is not 1-D integer labels in ``0..C-1``, or when the lengths differ.
    """
    p = np.asarray(prob)
    if p.ndim != 2:
        raise ValueError(f"prob must be a 2-D array (cases, classes), got shape {p.shape}")
    if p.shape[1] < 2:
        raise ValueError(f"prob must have at least 2 class columns, got {p.shape[1]}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)
            or p.dtype == np.bool_):
        raise ValueError(f"prob must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if not np.isfinite(p).all():
        bad = int((~np.isfinite(p)).any(axis=1).sum())
        raise ValueError(f"prob has non-finite values (NaN or inf) in {bad} case(s)")
    if p.size and (p.min() < -_PROB_TOLERANCE or p.max() > 1 + _PROB_TOLERANCE):
        raise ValueError(f"prob must hold probabilities in [0, 1], got values in [{p.min():g}, {p.max():g}]"
                         " (logits instead of softmax outputs?)")
    y = _check_labels(y_true, p.shape[1], "y_true")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} cases but prob has {p.shape[0]}")
    return y, p


def _check_labels(y: ArrayLike, n_classes: int, name: str) -> np.ndarray:
    """``y`` as int64 (N,): integer, bool or integral float labels in ``0..n_classes-1``, or ValueError."""
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not (a == np.round(a)).all():
            raise ValueError(f"{name} must hold integer class labels, got non-integer values")
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        bad = np.unique(a[(a < 0) | (a >= n_classes)])
        raise ValueError(f"{name} has labels outside 0..{n_classes - 1}: {bad[:10].tolist()}")
    return a


def _binary_options(n_classes: int, positive: int | None, threshold: float | None) -> tuple[int, float]:
    if n_classes != 2:
        if positive is not None or threshold is not None:
            raise ValueError(f"positive and threshold apply to binary problems only, not to {n_classes} classes")
        return -1, math.nan
    pos = 1 if positive is None else int(positive)
    if pos not in (0, 1):
        raise ValueError(f"positive must be 0 or 1 for a binary problem, not {positive}")
    thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if math.isnan(thr):
        raise ValueError("threshold must not be NaN")
    return pos, thr


def predict_labels(prob: ArrayLike, *, positive: int | None = None, threshold: float | None = None
                   ) -> np.ndarray:
    """Predicted labels (N,): binary ``score >= threshold`` -> ``positive``, else the other class; arg-max otherwise."""
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"prob must be a 2-D array (cases, classes >= 2), got shape {p.shape}")
    pos, thr = _binary_options(p.shape[1], positive, threshold)
    if p.shape[1] == 2:
        return np.where(p[:, pos] >= thr, pos, 1 - pos).astype(np.int64)
    return np.argmax(p, axis=1).astype(np.int64)


#: rules :func:`choose_threshold` knows
THRESHOLD_RULES = ("accuracy", "youden")


def choose_threshold(y_true: ArrayLike, prob: ArrayLike, *, positive: int = 1, rule: str = "accuracy") -> float:
    """A binary decision threshold on ``prob[:, positive]`` chosen on held-out predictions (e.g. out-of-fold).

    The candidates are the midpoints between consecutive distinct scores (a threshold there changes
    no prediction under small perturbations of the scores, unlike one at a score). ``rule``:

    * ``accuracy``: the candidates of highest accuracy;
    * ``youden``: the candidates of highest sensitivity + specificity - 1 (Youden's J).

    When several candidates tie, the median of them is taken (the middle of the best plateau, as far
    as possible from cases on either side). The result lies strictly between 0 and 1.

    Raises:
        ValueError: not binary, one class only, or an unknown rule.
    """
    y, p = check_inputs(y_true, prob)
    if p.shape[1] != 2:
        raise ValueError(f"a decision threshold applies to binary problems, not to {p.shape[1]} classes")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; known: {', '.join(THRESHOLD_RULES)}")
    is_pos = y == int(positive)
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs cases of both classes")
    score = np.clip(p[:, int(positive)], 0.0, 1.0)
    levels = np.unique(score)
    cuts = np.concatenate([[levels[0] / 2], (levels[1:] + levels[:-1]) / 2, [(levels[-1] + 1.0) / 2]])
    cuts = cuts[(cuts > 0.0) & (cuts < 1.0)]  # never empty: scores {0}, {1} or {0, 1} leave the cut 0.5
    called = score[None, :] >= cuts[:, None]  # (thresholds, cases)
    tp = (called & is_pos[None, :]).sum(1)
    tn = (~called & ~is_pos[None, :]).sum(1)
    if rule == "accuracy":
        value = (tp + tn) / len(y)
    else:
        value = tp / n_pos + tn / n_neg - 1.0
    best = np.flatnonzero(value >= value.max() - 1e-12)
    return float(np.median(cuts[best]))


# -- weighted building blocks: W is (B, N), one row of case weights per resample ---------------------------

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (the division never sees a 0: no floating-point warning)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), math.nan)


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (no warning) where every value is NaN."""
    ok = ~np.isnan(a)
    cnt = ok.sum(axis=axis)
    tot = np.where(ok, a, 0.0).sum(axis=axis)
    return _ratio(tot, cnt.astype(np.float64))


def _weighted_auc(score: np.ndarray, is_pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for ``is_pos`` under case weights ``w`` (B, N): (B,), NaN without both classes.

    Mann-Whitney: the weighted fraction of (positive, negative) pairs where the positive scores higher,
    ties counting 1/2.
    """
    b = w.shape[0]
    pos_idx = np.flatnonzero(is_pos)
    if score.size == 0 or pos_idx.size == 0 or pos_idx.size == score.size:
        return np.full(b, math.nan)
    order = np.argsort(score, kind="stable")
    s = score[order]
    new_group = np.empty(s.size, dtype=bool)
    new_group[0] = True
    np.not_equal(s[1:], s[:-1], out=new_group[1:])
    group = np.cumsum(new_group) - 1                 # tie group of each sorted position
    starts = np.flatnonzero(new_group)
    stops = np.append(starts[1:], s.size)            # one past the group's last position
    ws = w[:, order]
    neg = ~is_pos[order]
    cum_neg = np.zeros((b, s.size + 1))
    np.cumsum(ws * neg, axis=1, out=cum_neg[:, 1:])  # cum_neg[:, i]: negative weight of the i lowest
    sorted_pos = np.flatnonzero(~neg)
    g = group[sorted_pos]
    below = cum_neg[:, starts[g]]                    # negatives scoring strictly lower
    tied = cum_neg[:, stops[g]] - below              # negatives with the same score
    wp = ws[:, sorted_pos]
    num = (wp * (below + 0.5 * tied)).sum(axis=1)
    return _ratio(num, wp.sum(axis=1) * cum_neg[:, -1])


def _weighted_ece(correct: np.ndarray, conf: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE under case weights: sum over bins |sum correct - sum conf| / total weight."""
    bins = _bin_index(conf, n_bins)
    onehot = np.zeros((conf.size, n_bins))
    onehot[np.arange(conf.size), bins] = 1.0
    gap = w @ (onehot * (correct.astype(np.float64) - conf)[:, None])   # (B, bins)
    return _ratio(np.abs(gap).sum(axis=1), w.sum(axis=1))


def _edges(n_bins: int) -> np.ndarray:
    """Bin edges ``k / M`` (computed by division, so 0.3 is the float nearest 3/10, as ``linspace`` may not give)."""
    return np.arange(n_bins + 1) / n_bins


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence, bins ``(k/M, (k+1)/M]``, 0 in the first (values are clipped to [0, 1])."""
    return np.searchsorted(_edges(n_bins)[1:-1], np.clip(conf, 0.0, 1.0), side="left")


def _weighted_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray, positive: int, threshold: float,
                      n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """All metrics for each row of case weights ``w`` (B, N); inputs already validated."""
    n_classes = p.shape[1]
    total = w.sum(axis=1)
    pred = predict_labels(p, positive=positive if n_classes == 2 else None,
                          threshold=threshold if n_classes == 2 else None)
    correct = pred == y
    conf = p[np.arange(y.size), pred]
    out: dict[str, np.ndarray] = {}
    if n_classes == 2:
        truth_pos = y == positive
        pred_pos = pred == positive
        cells = np.stack([truth_pos & pred_pos, ~truth_pos & pred_pos, truth_pos & ~pred_pos,
                          ~truth_pos & ~pred_pos], axis=1).astype(np.float64)
        tp, fp, fn, tn = (w @ cells).T
        out["auc"] = _weighted_auc(p[:, positive], truth_pos, w)
        out["accuracy"] = _ratio(tp + tn, total)
        out["sensitivity"] = _ratio(tp, tp + fn)
        out["specificity"] = _ratio(tn, tn + fp)
        out["ppv"] = _ratio(tp, tp + fp)
        out["npv"] = _ratio(tn, tn + fn)
        out["f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
    else:
        cells = np.zeros((y.size, n_classes * n_classes))
        cells[np.arange(y.size), y * n_classes + pred] = 1.0
        cm = (w @ cells).reshape(-1, n_classes, n_classes)            # (B, truth, prediction)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        fn = cm.sum(axis=2) - tp
        fp = cm.sum(axis=1) - tp
        tn = total[:, None] - tp - fn - fp
        aucs = np.stack([_weighted_auc(p[:, k], y == k, w) for k in range(n_classes)], axis=1)
        out["auc"] = _nanmean(aucs, axis=1)
        out["accuracy"] = _ratio(tp.sum(axis=1), total)
        out["sensitivity"] = _nanmean(_ratio(tp, tp + fn), axis=1)
        out["specificity"] = _nanmean(_ratio(tn, tn + fp), axis=1)
        out["f1"] = _nanmean(_ratio(2 * tp, 2 * tp + fp + fn), axis=1)
    out["ece"] = _weighted_ece(correct, conf, w, n_bins)
    out["n"] = total
    return out


# -- public API -------------------------------------------------------------------------------------------

def classification_metrics(y_true: ArrayLike, prob: ArrayLike, *, positive: int | None = None,
                           threshold: float | None = None) -> dict[str, float]:
    """Metrics of class probabilities ``prob`` (N, C) against integer labels ``y_true`` (N,).

    Keys: ``auc``, ``accuracy``, ``sensitivity``, ``specificity``, ``f1``, ``ece``, ``n``, and for binary
    problems also ``ppv`` and ``npv`` (see the module docstring for the definitions). ``positive`` (0 or 1,
    default 1) and ``threshold`` (default 0.5) apply to binary problems only. Undefined metrics are NaN.

    Raises ValueError for mismatched lengths, labels outside ``0..C-1`` or non-finite probabilities.
    """
    y, p = check_inputs(y_true, prob)
    pos, thr = _binary_options(p.shape[1], positive, threshold)
    values = _weighted_metrics(y, p, np.ones((1, y.size)), pos, thr)
    return {k: float(v[0]) for k, v in values.items()}


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """Counts (C, C) as int64: rows are the true class, columns the predicted class."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, not {n_classes}")
    t = _check_labels(y_true, n_classes, "y_true")
    q = _check_labels(y_pred, n_classes, "y_pred")
    if t.shape != q.shape:
        raise ValueError(f"y_true has {t.size} cases but y_pred has {q.size}")
    return np.bincount(t * n_classes + q, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _binary_inputs(y_true_binary: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(truth as bool, score as float64)``, both 1-D and of one length; ValueError otherwise."""
    t = np.asarray(y_true_binary)
    s = np.asarray(score, dtype=np.float64)
    if t.ndim != 1 or s.ndim != 1 or t.shape != s.shape:
        raise ValueError(f"y_true_binary and score must be 1-D of the same length, got {t.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("score has non-finite values (NaN or inf)")
    return _check_labels(t, 2, "y_true_binary").astype(bool), s


def roc_curve(y_true_binary: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr, thresholds)``, one per distinct score plus the origin.

    ``thresholds`` decrease from ``inf`` (nothing predicted positive) through every distinct score; the
    point ``i`` counts ``score >= thresholds[i]`` as positive (scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``). ``tpr`` is NaN without positives, ``fpr`` NaN without negatives.
    """
    t, s = _binary_inputs(y_true_binary, score)
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if s.size else np.zeros(0, dtype=np.int64)
    tps = np.cumsum(t)[last].astype(np.float64)
    fps = (last + 1) - tps
    tps = np.append(0.0, tps)
    fps = np.append(0.0, fps)
    thresholds = np.append(np.inf, s[last])
    return _ratio(fps, np.full_like(fps, fps[-1])), _ratio(tps, np.full_like(tps, tps[-1])), thresholds


def roc_auc(y_true_binary: ArrayLike, score: ArrayLike) -> float:
    """ROC AUC of ``score`` for the binary truth ``y_true_binary`` (ties count 1/2); NaN without both classes."""
    t, s = _binary_inputs(y_true_binary, score)
    return float(_weighted_auc(s, t, np.ones((1, s.size)))[0])


def reliability(y_true: ArrayLike, prob: ArrayLike, n_bins: int = ECE_BINS, *, positive: int | None = None,
                threshold: float | None = None) -> dict[str, Any]:
    """Reliability-diagram data of the confidence of the predicted label.

    Returns ``edges`` (n_bins + 1,), per bin ``confidence`` (mean confidence), ``accuracy`` (fraction
    correct; both NaN for an empty bin) and ``count`` (int), the per-case ``confidences``, and ``ece``
    (equal to ``classification_metrics(...)["ece"]`` for ``n_bins=10``).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, not {n_bins}")
    y, p = check_inputs(y_true, prob)
    pos, thr = _binary_options(p.shape[1], positive, threshold)
    pred = predict_labels(p, positive=None if p.shape[1] > 2 else pos, threshold=None if p.shape[1] > 2 else thr)
    conf = p[np.arange(y.size), pred]
    correct = (pred == y).astype(np.float64)
    bins = _bin_index(conf, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    c = count.astype(np.float64)
    ece = float(np.abs(acc_sum - conf_sum).sum() / y.size) if y.size else math.nan
    return {"edges": _edges(n_bins), "confidence": _ratio(conf_sum, c),
            "accuracy": _ratio(acc_sum, c), "count": count.astype(np.int64), "confidences": conf, "ece": ece}


def metrics_with_ci(y_true: ArrayLike, prob: ArrayLike, *, positive: int | None = None,
                    threshold: float | None = None, seed: int = 0, n_boot: int = 2000, level: float = 0.95
                    ) -> dict[str, dict[str, Any]]:
    """``{metric: {"value": v, "ci95": [lo, hi]}}``: ``classification_metrics`` with bootstrap intervals.

    Cases are resampled with replacement (``bootstrap_cases``, seeded by ``seed``) and every metric is
    recomputed on each of the ``n_boot`` resamples; the interval holds the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (the key stays ``ci95`` whatever ``level``). Resamples where a metric is
    undefined (an AUC with one class drawn) are left out of that metric's interval.
    """
    y, p = check_inputs(y_true, prob)
    pos, thr = _binary_options(p.shape[1], positive, threshold)
    point = {k: float(v[0]) for k, v in _weighted_metrics(y, p, np.ones((1, y.size)), pos, thr).items()}
    n_cases = y.size

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        rows = idx.shape[0]
        flat = (idx + (np.arange(rows) * n_cases)[:, None]).ravel()
        w = np.bincount(flat, minlength=rows * n_cases).reshape(rows, n_cases).astype(np.float64)
        return _weighted_metrics(y, p, w, pos, thr)

    cis = bootstrap_cases(statistic, n_cases, seed=seed, n=n_boot, level=level, vectorized=True)
    return {k: {"value": v, "ci95": list(cis.get(k, (v, v)))} for k, v in point.items()}
