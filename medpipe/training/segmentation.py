"""Segmenter pieces for :func:`medpipe.training.loop.fit`: the batch preparation, the validation and the
k-fold stratum (whether a case's label map has foreground)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from medpipe.distributed.group import SINGLE, Distributed
from medpipe.training.loop import Validation


def _plain(t: Any) -> Any:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def segmenter_batches(info: dict[str, Any], device: str) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """``batch -> (images, class-index label maps)`` on ``device`` (labels mapped by ``info``: ``label_info``)."""
    from medpipe.data.labels import map_labels

    def prepare(batch: dict[str, Any]) -> tuple[Any, Any]:
        return (batch["image"].to(device, non_blocking=True),
                map_labels(batch["label"].to(device, non_blocking=True), info))

    return prepare


def has_foreground(item: dict[str, Any]) -> int:
    """1 when the item's label map has a labelled voxel (the datalist's ``has_foreground`` when recorded, else
    read from the file), else 0: the stratum of a segmentation k-fold split."""
    if item.get("has_foreground") is not None:
        return int(bool(item["has_foreground"]))
    if not item.get("label"):
        return 0
    from medpipe.data.volumes import read_voxels

    return int(bool(read_voxels(item["label"]).any()))


def segmenter_validation(net: Any, val_ds: Any, info: dict[str, Any], roi_size: Sequence[int], *,
                         sw_batch_size: int = 4, overlap: float = 0.25, device: str = "cpu",
                         amp: bool = False, select: str = "dice", dist: Distributed = SINGLE
                         ) -> Callable[[int], Validation]:
    """``epoch -> Validation``: sliding-window inference on every val case,
    :func:`medpipe.metrics.segmentation.validation_dice` (column ``val_dice``) and
    :func:`~medpipe.metrics.segmentation.validation_loss` (``val_loss``).

    ``select``: ``dice`` keeps the higher Dice, ``loss`` the lower loss, ``last`` every validation.
    ``dist`` (several ranks): ``val_ds`` holds this rank's share of the cases (:func:`medpipe.training.ddp.shard`);
    the per-case results of all ranks are gathered and the metrics computed from all of them, in case order, on
    every rank (the numbers one process computes over all cases).
    """
    from medpipe.data.labels import map_labels, n_classes
    from medpipe.inference.segmentation import infer_probabilities
    from medpipe.metrics.segmentation import combine_validation_dice, validation_case, validation_loss
    from medpipe.training.ddp import gather_shards

    def cases() -> Iterator[tuple[tuple[float | None, float | None], float]]:
        for i in range(len(val_ds)):
            d = val_ds[i]
            prob = infer_probabilities(net, _plain(d["image"])[None].float(), roi_size, sw_batch_size=sw_batch_size,
                                       overlap=overlap, device=device, amp=amp)
            truth = map_labels(_plain(d["label"][None]), info)
            yield validation_case(prob, truth, n_classes(info)), validation_loss(prob, truth, n_classes(info))

    def validate(epoch: int) -> Validation:
        results = gather_shards(list(cases()), dist)
        vd = combine_validation_dice(case for case, _ in results)
        losses = [loss for _, loss in results]
        vl = float(sum(losses) / len(losses)) if losses else math.nan
        if select == "loss":
            score = None if math.isnan(vl) else (-vl,)
        elif select == "last":
            score = (float(epoch),)
        else:
            score = None if math.isnan(vd) else (vd,)
        return Validation({"val_dice": vd, "val_loss": round(vl, 6)}, score, f"val Dice {vd:.4f}, val loss {vl:.4f}")

    return validate
