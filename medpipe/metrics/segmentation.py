"""Segmentation metrics (MONAI underneath).

* Evaluation: :func:`dice_hd95` (Dice and the 95th-percentile Hausdorff distance of two class maps),
  :func:`score_case` and :func:`summarise` (means over cases with bootstrap 95 % CIs).
* Validation Dice (what ``train_segmenter`` selects its checkpoint by): :func:`foreground_dice` per case
  and :func:`validation_dice` over the val cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


def dice_hd95(pred: np.ndarray, truth: np.ndarray, classes: list[int], spacing: Any, hd95: bool = True
              ) -> dict[int, tuple[float, float]]:
    """``{class: (Dice, HD95 mm)}`` of two class maps on one grid (MONAI metrics).

    Dice is NaN when the truth lacks the class (undefined, or 0 for any false positive: such cases are
    counted separately); HD95 is NaN unless both have it.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    out: dict[int, tuple[float, float]] = {}
    for c in classes:
        p = torch.from_numpy(pred == c)[None, None]
        t = torch.from_numpy(truth == c)[None, None]
        yp = torch.cat([~p, p], 1).float()
        yt = torch.cat([~t, t], 1).float()
        if not bool(t.any()):
            d = math.nan
        else:
            d = float(compute_dice(yp, yt, include_background=False, ignore_empty=True).reshape(-1)[0])
        h = math.nan
        if hd95 and bool(t.any()) and bool(p.any()):
            h = float(compute_hausdorff_distance(yp, yt, include_background=False, percentile=95,
                                                 spacing=[float(s) for s in spacing]).reshape(-1)[0])
        out[c] = (d, h)
    return out


def format_ci(ci: Any) -> str:
    """``[lo, hi]`` for a log line, or ``undefined (fewer than 2 cases)`` when the interval is None / NaN."""
    if ci is None or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "undefined (fewer than 2 cases)"
    return f"[{float(ci[0]):.3f}, {float(ci[1]):.3f}]"


def finite_or_none(x: float | None, nd: int = 6) -> float | None:
    """``x`` rounded for JSON, or None when undefined (NaN / inf)."""
    return None if x is None or math.isnan(x) or math.isinf(x) else round(float(x), nd)


def nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


@dataclass
class CaseScores:
    """One case: per class (Dice, HD95 mm) and the same for the whole foreground (every class > 0)."""

    per_class: dict[int, tuple[float, float]]
    whole: tuple[float, float]
    truth_has: bool  # the truth has any foreground
    pred_has: bool  # the prediction has any foreground
    truth_ml: float
    pred_ml: float
    predicted: frozenset[int] = frozenset()  # the classes the prediction has


def score_case(pred: np.ndarray, truth: np.ndarray, classes: list[int], spacing: Any, hd95: bool = True
               ) -> CaseScores:
    """Score a predicted class map against the truth's class map (same grid, ``spacing`` in mm)."""
    per_class = dice_hd95(pred, truth, classes, spacing, hd95)
    whole = (dice_hd95((pred > 0).astype(np.uint8), (truth > 0).astype(np.uint8), [1], spacing, hd95)[1]
             if len(classes) > 1 else per_class[classes[0]])
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return CaseScores(per_class, whole, bool(truth.any()), bool(pred.any()),
                      float((truth > 0).sum()) * voxel_ml, float((pred > 0).sum()) * voxel_ml,
                      frozenset(c for c in classes if bool((pred == c).any())))


def summarise(cases: list[CaseScores], class_names: dict[int, str], *, seed: int, n_boot: int) -> dict[str, Any]:
    """Metrics over cases (see :mod:`medpipe.stages.evaluate` for their definitions), bootstrap 95 % CIs."""
    from medpipe.metrics.bootstrap import bootstrap_ci

    tumour = [c for c in cases if c.truth_has]
    dice_vals = [c.whole[0] for c in tumour]
    hd_vals = [c.whole[1] for c in tumour if not math.isnan(c.whole[1])]
    free = [c for c in cases if not c.truth_has]
    dice_all = [c.whole[0] if c.truth_has else (1.0 if not c.pred_has else 0.0) for c in cases]
    out: dict[str, Any] = {
        "dice": finite_or_none(nanmean(dice_vals)),
        "dice_ci95": [finite_or_none(x) for x in bootstrap_ci(dice_vals, seed=seed, n=n_boot)],
        "hd95": finite_or_none(nanmean(hd_vals), 3),
        "hd95_ci95": [finite_or_none(x, 3) for x in bootstrap_ci(hd_vals, seed=seed, n=n_boot)],
        "dice_all_cases": finite_or_none(nanmean(dice_all)),
        "n_cases": len(cases), "n_with_tumour": len(tumour),
        "false_positive_cases": sum(1 for c in free if c.pred_has),
        "missed_tumours": sum(1 for c in tumour if not c.pred_has),
    }
    per_label: dict[str, Any] = {}
    for k, name in class_names.items():
        vals = [c.per_class[k] for c in cases]
        # Dice is NaN exactly when the case's truth lacks the class
        absent_but_predicted = sum(1 for c in cases if math.isnan(c.per_class[k][0]) and k in c.predicted)
        present_but_missed = sum(1 for c in cases if not math.isnan(c.per_class[k][0]) and k not in c.predicted)
        dices = [v[0] for v in vals if not math.isnan(v[0])]  # cases whose truth has the class
        hds = [v[1] for v in vals if not math.isnan(v[1])]
        per_label[name] = {"dice": finite_or_none(nanmean(dices)),
                           "dice_ci95": [finite_or_none(x) for x in bootstrap_ci(dices, seed=seed, n=n_boot)],
                           "hd95": finite_or_none(nanmean(hds), 3),
                           "hd95_ci95": [finite_or_none(x, 3) for x in bootstrap_ci(hds, seed=seed, n=n_boot)],
                           "n": len(dices), "n_hd95": len(hds),
                           "false_positive_cases": absent_but_predicted, "missed_cases": present_but_missed}
    out["per_label"] = per_label
    return out
#: the columns of ``per_label.csv``
PER_LABEL_COLUMNS = ("class", "n", "dice", "dice_ci95_low", "dice_ci95_high", "n_hd95", "hd95_mm", "hd95_ci95_low",
                     "hd95_ci95_high", "false_positive_cases", "missed_cases")


def per_label_rows(per_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``per_label.csv`` (undefined values empty)."""
    return [{"class": name, "n": m["n"], "dice": m["dice"], "dice_ci95_low": m["dice_ci95"][0],
             "dice_ci95_high": m["dice_ci95"][1], "n_hd95": m["n_hd95"], "hd95_mm": m["hd95"],
             "hd95_ci95_low": m["hd95_ci95"][0], "hd95_ci95_high": m["hd95_ci95"][1],
             "false_positive_cases": m["false_positive_cases"], "missed_cases": m["missed_cases"]}
            for name, m in per_label.items()]



def crossval_summary(per_fold: list[list[CaseScores]], class_names: dict[int, str], *, seed: int,
                     n_boot: int = 2000) -> dict[str, Any]:
    """Cross-validation metrics from the out-of-fold cases of each fold.

    ``cv_dice`` / ``cv_hd95`` (with ``*_ci95``): pooled over every out-of-fold case (each scored by the model
    that never saw it), as :func:`summarise` defines them; ``cv_dice_folds``: each fold's Dice;
    ``cv_dice_mean`` and ``cv_dice_sd``: their mean and sample standard deviation (None when fewer than two
    folds have a defined Dice). ``folds`` and ``pooled`` hold the full :func:`summarise` of each.
    """
    folds = [summarise(cases, class_names, seed=seed, n_boot=n_boot) for cases in per_fold]
    pooled = summarise([c for cases in per_fold for c in cases], class_names, seed=seed, n_boot=n_boot)
    dice = [f["dice"] for f in folds]
    defined = [d for d in dice if d is not None]
    return {
        "cv_dice": pooled["dice"], "cv_dice_ci95": pooled["dice_ci95"],
        "cv_hd95": pooled["hd95"], "cv_hd95_ci95": pooled["hd95_ci95"],
        "cv_dice_folds": dice,
        "cv_dice_mean": finite_or_none(float(np.mean(defined))) if defined else None,
        "cv_dice_sd": finite_or_none(float(np.std(defined, ddof=1))) if len(defined) >= 2 else None,
        "cv_n_cases": pooled["n_cases"], "cv_n_with_tumour": pooled["n_with_tumour"],
        "folds": folds, "pooled": pooled,
    }


# -- validation Dice (train_segmenter's selection metric) ----------------------------------------------


def foreground_dice(prob: Any, truth: Any, classes: int) -> list[float]:
    """Per foreground class Dice of ``argmax(prob)`` vs ``truth`` (class indices; both ``(B, ...)`` on one
    grid, ``prob`` with ``classes`` channels); NaN where the truth lacks the class."""
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    pred = one_hot(prob.argmax(1, keepdim=True), classes)
    gt = one_hot(truth.long(), classes)
    d = compute_dice(pred, gt, include_background=False, ignore_empty=True)
    return [float(v) for v in torch.as_tensor(d).reshape(-1)]


def validation_dice(cases: Iterable[tuple[Any, Any]], classes: int) -> float:
    """Mean over cases of the mean foreground-class Dice, over the classes each case's truth has.

    ``cases``: ``(probabilities (1, classes, ...), truth class indices (1, 1, ...))`` per case. Cases
    whose truth has no foreground are not averaged in (as in ``evaluate``); when no case has any, the
    score is the fraction of them predicted empty. NaN without cases.
    """
    return combine_validation_dice(validation_case(prob, truth, classes) for prob, truth in cases)


def validation_case(prob: Any, truth: Any, classes: int) -> tuple[float | None, float | None]:
    """One case's share of :func:`validation_dice`: ``(mean foreground Dice over the classes its truth has,
    None)``, or for a truth without foreground ``(None, 1.0 if nothing was predicted else 0.0)``. Cases scored
    apart (e.g. on several processes) combine with :func:`combine_validation_dice`."""
    import numpy as np

    case = [v for v in foreground_dice(prob, truth, classes) if not math.isnan(v)]
    if case:
        return float(np.mean(case)), None
    return None, 1.0 if int((prob.argmax(1) > 0).sum()) == 0 else 0.0


def combine_validation_dice(cases: Iterable[tuple[float | None, float | None]]) -> float:
    """:func:`validation_dice` from the :func:`validation_case` of every case, in case order."""
    import numpy as np

    scores: list[float] = []
    empty_ok: list[float] = []
    for dice, empty in cases:
        if dice is not None:
            scores.append(dice)
        elif empty is not None:
            empty_ok.append(empty)
    if scores:
        return float(np.mean(scores))
    return float(np.mean(empty_ok)) if empty_ok else float("nan")


def validation_loss(prob: Any, truth: Any, classes: int) -> float:
    """The training loss's counterpart on one validation case: soft Dice loss (every class, background
    included, as ``DiceCELoss`` by default) plus cross-entropy, from probabilities ``(1, classes, ...)`` and
    class indices ``(1, 1, ...)`` on one grid."""
    import torch

    p = torch.as_tensor(prob).float()
    t = torch.as_tensor(truth).long()[:, 0]
    onehot = torch.nn.functional.one_hot(t, classes).movedim(-1, 1).float()
    dims = tuple(range(2, p.ndim))
    inter = (p * onehot).sum(dims)
    dice = 1.0 - (2.0 * inter + 1e-5) / (p.sum(dims) + onehot.sum(dims) + 1e-5)
    ce = -torch.log(p.gather(1, t[:, None]).clamp_min(1e-7)).mean()
    return float(dice.mean() + ce)
