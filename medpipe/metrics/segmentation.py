"""Segmentation metrics.

Validation Dice (what ``train_segmenter`` selects its checkpoint by): :func:`foreground_dice` per case
and :func:`validation_dice` over the val cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

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
    import numpy as np

    scores: list[float] = []
    empty_ok: list[float] = []
    for prob, truth in cases:
        case = [v for v in foreground_dice(prob, truth, classes) if not math.isnan(v)]
        if case:
            scores.append(float(np.mean(case)))
        else:
            empty_ok.append(1.0 if int((prob.argmax(1) > 0).sum()) == 0 else 0.0)
    if scores:
        return float(np.mean(scores))
    return float(np.mean(empty_ok)) if empty_ok else float("nan")
