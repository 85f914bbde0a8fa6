"""Classifier pieces for :func:`medpipe.training.loop.fit`: k-fold items, batch preparation, validation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from medpipe.training.loop import Validation

Items = list[dict[str, Any]]


def kfold_items(train: Items, val: Items, k: int | None, seed: int) -> list[tuple[Items, Items]]:
    """``[(train items, val items)]``: the datalist's split, or k stratified patient folds of train + val.

    Synthetic items (``augment``'s) stay in every fold's train part and never join a validation fold.
    """
    if k is None:
        return [(train, val)]
    from medpipe.data.splits import split_patients

    real = [it for it in [*train, *val] if not it.get("synthetic")]
    synthetic = [it for it in train if it.get("synthetic")]
    strata: dict[str, int] = {}
    for it in real:
        pid = str(it.get("patient_id") or it["image"])
        strata[pid] = max(strata.get(pid, 0), int(it["class"]))
    out = []
    for i in range(k):
        parts = split_patients(strata, val=0.0, test=0.0, seed=seed, folds=k, fold=i)
        held = set(parts["val"])
        fold_val = [it for it in real if str(it.get("patient_id") or it["image"]) in held]
        out.append(([it for it in real if str(it.get("patient_id") or it["image"]) not in held] + synthetic, fold_val))
    return out


def classifier_batches(device: str) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """``batch -> (images, class indices (B,))`` on ``device``."""
    import torch

    def prepare(batch: dict[str, Any]) -> tuple[Any, Any]:
        return batch["image"].to(device, non_blocking=True), torch.as_tensor(batch["class"]).long().to(device).view(-1)

    return prepare


def classifier_validation(net: Any, val_ds: Any, y_val: Any, *, select: Literal["auc", "loss"] = "auc",
                          device: str = "cpu", amp: bool = False, tta_axes: list[int] | None = None,
                          batch_size: int = 32) -> Callable[[int], Validation]:
    """``epoch -> Validation``: class probabilities of the val images (flip TTA over ``tta_axes``), ROC AUC
    (macro one-vs-rest when multi-class) and cross-entropy (columns ``val_loss``, ``val_auc``, rounded).

    Selection: ``auc`` keeps the higher AUC, ties broken by the lower loss (a NaN AUC, e.g. a one-class
    fold, counts as -1); ``loss`` the lower loss. ``values``: ``auc`` and ``val_loss`` unrounded,
    ``score`` (the AUC or -1) and ``prob`` (``(N, C)``).
    """
    from medpipe.inference.classification import predict_proba
    from medpipe.metrics.classification import classification_metrics

    y = np.asarray(y_val)

    def validate(epoch: int) -> Validation:
        net.eval()
        prob = predict_proba([net], val_ds, device=device, amp=amp, tta_axes=tta_axes, batch_size=batch_size)
        auc = classification_metrics(y, prob)["auc"]
        vloss = float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0))))
        score = -1.0 if math.isnan(auc) else float(auc)
        return Validation(
            {"val_loss": round(vloss, 6), "val_auc": None if math.isnan(auc) else round(float(auc), 6)},
            (-vloss,) if select == "loss" else (score, -vloss), f"val loss {vloss:.4f}, val AUC {auc:.4f}",
            {"auc": auc, "val_loss": vloss, "score": score, "prob": prob})

    return validate


#: the score a first classifier validation must beat (as the hand-written loop had it: AUC -1, loss infinite)
CLASSIFIER_FLOOR = {"auc": (-1.0, -math.inf), "loss": (-math.inf,)}
