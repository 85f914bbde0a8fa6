"""Segmenter pieces for :func:`medpipe.training.loop.fit`: the batch preparation and the validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


def segmenter_validation(net: Any, val_ds: Any, info: dict[str, Any], roi_size: Sequence[int], *,
                         sw_batch_size: int = 4, overlap: float = 0.25, device: str = "cpu",
                         amp: bool = False) -> Callable[[int], Validation]:
    """``epoch -> Validation``: sliding-window inference on every val case and
    :func:`medpipe.metrics.segmentation.validation_dice` (column ``val_dice``; kept when higher)."""
    from medpipe.data.labels import map_labels, n_classes
    from medpipe.inference.segmentation import infer_probabilities
    from medpipe.metrics.segmentation import validation_dice

    def cases() -> Iterator[tuple[Any, Any]]:
        for i in range(len(val_ds)):
            d = val_ds[i]
            prob = infer_probabilities(net, _plain(d["image"])[None].float(), roi_size, sw_batch_size=sw_batch_size,
                                       overlap=overlap, device=device, amp=amp)
            yield prob, map_labels(_plain(d["label"][None]), info)

    def validate(epoch: int) -> Validation:
        vd = validation_dice(cases(), n_classes(info))
        return Validation({"val_dice": vd}, None if math.isnan(vd) else (vd,), f"val Dice {vd:.4f}")

    return validate
