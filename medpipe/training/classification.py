"""Classifier pieces for :func:`medpipe.training.loop.fit`: k-fold items, batch preparation, validation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medpipe.distributed.group import SINGLE, Distributed
from medpipe.training.loop import Validation

Items = list[dict[str, Any]]


def kfold_items(train: Items, val: Items, k: int | None, seed: int,
                stratum: Callable[[dict[str, Any]], int] | None = None) -> list[tuple[Items, Items]]:
    """``[(train items, val items)]``: the datalist's split, or k stratified patient folds of train + val.

    ``stratum(item)``: what the folds keep in proportion (default: the item's class; a patient's stratum is
    the largest of its items'). Synthetic items (``augment``'s) stay in every fold's train part and never
    join a validation fold.
    """
    if k is None:
        return [(train, val)]
    from medpipe.data.splits import split_patients

    real = [it for it in [*train, *val] if not it.get("synthetic")]
    synthetic = [it for it in train if it.get("synthetic")]
    strata: dict[str, int] = {}
    for it in real:
        pid = str(it.get("patient_id") or it["image"])
        strata[pid] = max(strata.get(pid, 0), int(it["class"]) if stratum is None else int(stratum(it)))
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


def classifier_validation(net: Any, val_ds: Any, y_val: Any, *, select: Literal["auc", "loss", "last"] = "auc",
                          device: str = "cpu", amp: bool = False, tta_axes: list[int] | None = None,
                          batch_size: int = 32, dist: Distributed = SINGLE) -> Callable[[int], Validation]:
    """``epoch -> Validation``: class probabilities of the val images (flip TTA over ``tta_axes``), ROC AUC
    (macro one-vs-rest when multi-class) and cross-entropy (columns ``val_loss``, ``val_auc``, rounded).

    Selection: ``auc`` keeps the higher AUC, ties broken by the lower loss (a NaN AUC, e.g. a one-class
    fold, counts as -1); ``loss`` the lower loss; ``last`` every validation (so the last epoch's weights). ``values``: ``auc`` and ``val_loss`` unrounded,
    ``score`` (the AUC or -1) and ``prob`` (``(N, C)``).
    ``dist`` (several ranks): ``val_ds`` holds this rank's share of the images (:func:`medpipe.training.ddp.shard`)
    and ``y_val`` the classes of all of them; the probabilities of all ranks are gathered, in item order, and the
    metrics computed from all of them on every rank.
    """
    from medpipe.inference.classification import predict_proba
    from medpipe.metrics.classification import classification_metrics
    from medpipe.training.ddp import gather_shards

    y = np.asarray(y_val)

    def validate(epoch: int) -> Validation:
        net.eval()
        prob = predict_proba([net], val_ds, device=device, amp=amp, tta_axes=tta_axes, batch_size=batch_size)
        if dist.enabled:
            prob = np.stack(gather_shards(list(prob), dist))
        auc = classification_metrics(y, prob)["auc"]
        vloss = float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0))))
        score = -1.0 if math.isnan(auc) else float(auc)
        key = (-vloss,) if select == "loss" else (float(epoch),) if select == "last" else (score, -vloss)
        return Validation(
            {"val_loss": round(vloss, 6), "val_auc": None if math.isnan(auc) else round(float(auc), 6)},
            key, f"val loss {vloss:.4f}, val AUC {auc:.4f}",
            {"auc": auc, "val_loss": vloss, "score": score, "prob": prob})

    return validate


#: the score a first classifier validation must beat (as the hand-written loop had it: AUC -1, loss infinite)
CLASSIFIER_FLOOR = {"auc": (-1.0, -math.inf), "loss": (-math.inf,), "last": (-math.inf,)}


def out_of_fold(checkpoints: list[Path], held_out: list[Items], *, device: str = "cpu", amp: bool = False,
                tta_axes: list[int] | None = None, batch_size: int = 64) -> np.ndarray:
    """``(N, C)`` probabilities of every held-out item, each by the checkpoint of its own fold (``held_out[i]``
    by ``checkpoints[i]``), concatenated in fold order, with the flip TTA the model package scores with."""
    from medpipe.data.datalist import model_inputs
    from medpipe.data.datasets import make_dataset
    from medpipe.inference.classification import ClassificationModel

    out = []
    for ckpt, items in zip(checkpoints, held_out, strict=True):
        model = ClassificationModel.load(ckpt, device, amp)
        ds = make_dataset(model_inputs(items), model.eval_transforms, "none")
        out.append(model.predict_proba(ds, tta_axes=tta_axes, batch_size=batch_size))
    return np.concatenate(out, axis=0)


def decide(csv_path: Path, checkpoints: list[Path], held_out: list[Items], prob: np.ndarray, names: dict[int, str],
           *, positive: int, rule: str) -> dict[str, Any]:
    """Choose the binary decision threshold on held-out predictions, record it in every checkpoint
    (``decision``) and write the predictions it was chosen on to ``csv_path``.

    Returns ``{"threshold", "rule", "positive_class", "n", "accuracy", "auc"}`` (accuracy at the threshold and
    AUC over those predictions).
    """
    from medpipe.data.datalist import case_name
    from medpipe.inference.checkpoint import record_decision
    from medpipe.io import write_csv_atomic
    from medpipe.metrics.classification import choose_threshold, classification_metrics

    y = np.asarray([int(it["class"]) for items in held_out for it in items])
    try:
        threshold = choose_threshold(y, prob, positive=positive, rule=rule)
    except ValueError as exc:
        from medpipe.errors import StageError

        raise StageError(f"threshold_rule {rule}: {exc}") from exc
    m = classification_metrics(y, prob, positive=positive, threshold=threshold)
    decision = {"threshold": round(threshold, 6), "rule": rule, "positive_class": int(positive), "n": int(len(y)),
                "accuracy": round(float(m["accuracy"]), 6),
                "auc": None if math.isnan(m["auc"]) else round(float(m["auc"]), 6)}
    rows = []
    k = 0
    for fold, items in enumerate(held_out):
        for it in items:
            rows.append({"case": case_name(it), "patient_id": it.get("patient_id", ""), "fold": fold,
                         "true": int(it["class"]), **{f"prob_{c}": f"{float(prob[k, c]):.6f}" for c in range(len(names))}})
            k += 1
    write_csv_atomic(csv_path, rows, ["case", "patient_id", "fold", "true", *[f"prob_{c}" for c in range(len(names))]])
    for ckpt in checkpoints:
        record_decision(ckpt, {k: decision[k] for k in ("threshold", "rule", "positive_class", "n")})
    return decision
