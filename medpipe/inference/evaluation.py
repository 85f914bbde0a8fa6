"""Segmentation evaluation on held-out cases: predict on the source grid, score against the label map.

One code path for ``evaluate`` (the test split) and for the out-of-fold predictions of a k-fold
``train_segmenter`` (each pooled case by the fold model that never saw it). Per case the item goes
through the eval transforms, :meth:`SegmentationModel.segment` (TTA and post-processing as set), and
the predicted class map is compared with the label map on the label map's own grid (never resampled):
Dice and HD95 per class and for the whole foreground (:func:`medpipe.metrics.segmentation.score_case`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from medpipe.errors import StageError
from medpipe.inference.segmentation import SegmentationModel
from medpipe.metrics.segmentation import CaseScores, finite_or_none, score_case


@dataclass
class CaseResult:
    """One evaluated case."""

    item: dict[str, Any]
    scores: CaseScores
    row: dict[str, Any]  # the cases.csv row
    mask: np.ndarray  # predicted class map on the label map's grid
    truth: np.ndarray  # the truth as class indices
    grid: Any  # medpipe.data.volumes.GridSpec of the label map


def case_row(item: dict[str, Any], case: CaseScores, class_names: dict[int, str]) -> dict[str, Any]:
    """The ``cases.csv`` row of a scored case (whole foreground, and per class when there are several)."""
    row: dict[str, Any] = {
        "patient_id": item.get("patient_id"), "study_uid": item.get("study_uid"),
        "has_tumour": int(case.truth_has), "dice_whole_tumour": finite_or_none(case.whole[0]),
        "hd95_whole_tumour": finite_or_none(case.whole[1], 3),
        "truth_ml": round(case.truth_ml, 3), "pred_ml": round(case.pred_ml, 3),
    }
    if len(class_names) > 1:
        for c, (d, h) in case.per_class.items():
            key = class_names[c].replace(" ", "_")
            row[f"dice_{key}"] = finite_or_none(d)
            row[f"hd95_{key}"] = finite_or_none(h, 3)
    return row


def score_cases(model: SegmentationModel, items: list[dict[str, Any]], *,
                transforms: list[dict[str, Any]] | None = None, tta: bool | None = None,
                min_component_ml: float | None = None, hd95: bool = True) -> Iterator[CaseResult]:
    """Segment and score each labelled item, one at a time (``transforms``: None = the model's eval transforms;
    ``tta`` / ``min_component_ml``: None = the model's settings).

    Raises:
        StageError: a case cannot be loaded (naming its patient).
    """
    from medpipe.data.datasets import make_dataset
    from medpipe.data.labels import map_labels
    from medpipe.data.volumes import read_grid, read_voxels

    ds = make_dataset(items, transforms if transforms is not None else model.eval_transforms, "none")
    classes = model.classes
    for i, item in enumerate(items):
        try:
            data = ds[i]
            truth_raw = read_voxels(item["label"])
            grid = read_grid(item["label"])
        except Exception as exc:
            raise StageError(f"case {item.get('patient_id')}: cannot be loaded ({type(exc).__name__}: {exc})"
                             ) from exc
        pred = model.segment(data, grid, tta=tta, min_component_ml=min_component_ml).mask
        truth = map_labels(truth_raw, model.labels).astype(np.uint8)
        case = score_case(pred, truth, sorted(classes), grid.spacing, hd95)
        yield CaseResult(item, case, case_row(item, case, classes), pred, truth, grid)
