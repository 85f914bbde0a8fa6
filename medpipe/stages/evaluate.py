"""Stage ``evaluate``: score a trained segmenter on held-out studies, on their source grid.

The checkpoint is loaded once; every study of the split (default ``test``) goes through the eval
transforms stored in the checkpoint, sliding-window inference (optionally with flip test-time
augmentation), and back onto the reference volume's grid, where it is compared with the label map
as the dataset stage wrote it (never resampled). Per case and per class: Dice and HD95 (mm) with
``monai.metrics``; for multiclass models also the whole tumour (every class > 0).

Outputs in the stage folder: ``cases.csv`` (one row per case), ``overlays/*.png`` (image, ground
truth outlined in sky blue, prediction in dashed orange, on the slice with most tumour) and
``summary.json``. Metrics::

    dice            mean whole-tumour Dice over the cases whose ground truth has tumour
    dice_ci95       its bootstrap 95 % confidence interval (cases resampled, seeded by the run's seed)
    hd95, hd95_ci95 the same for HD95 in mm (cases where truth and prediction are both non-empty)
    dice_all_cases  mean Dice over every case, an empty prediction on an empty truth counting as 1
    false_positive_cases  tumour-free cases with any voxel predicted as tumour
    per_label       {class name: {dice, dice_ci95, hd95, n}}

Tumour-free cases are left out of ``dice`` because their Dice is undefined (0/0): counting them as 1
would reward a model for the easy cases; their errors show in ``false_positive_cases``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from medpipe.data.datalist import case_name, load_datalist, split_items
from medpipe.data.labels import map_labels
from medpipe.data.transforms import TransformList
from medpipe.errors import StageError
from medpipe.inference.segmentation import SegmentationModel
from medpipe.io import sha256_file, write_csv_atomic, write_text_atomic
from medpipe.metrics.segmentation import CaseScores, finite_or_none, score_case, summarise
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage


class EvaluateParams(StageParams):
    checkpoint: InputPath | None = Field(None, description="None: the train_segmenter stage's checkpoint")
    datalist: InputPath | None = Field(None, description="None: the dataset stage's datalist")
    split: Literal["train", "val", "test"] = "test"
    eval_transforms: TransformList | None = Field(None, description="None: those stored in the checkpoint")
    tta: bool = Field(False, description="average over flips along each axis (test-time augmentation)")
    hd95: bool = True
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for the 95 % confidence intervals")
    overlays: int = Field(4, ge=0, description="how many cases get a PNG overlay")
    overlay_channel: str | None = Field(None, description="channel shown in overlays; None: the reference channel")


@stage("evaluate", EvaluateParams,
       needs=(Need("checkpoint", params=("checkpoint",)), Need("datalist", params=("datalist",))),
       gives=("evaluation",))
def evaluate(ctx: RunContext, p: EvaluateParams) -> StageResult:
    from medpipe.data.datasets import make_dataset
    from medpipe.data.volumes import read_grid, read_voxels
    from medpipe.report.segmentation_plots import overlay_png

    ckpt_path = ctx.input("checkpoint", p.checkpoint)
    dl_path = ctx.input("datalist", p.datalist)
    model = SegmentationModel.load(ckpt_path, ctx.device, ctx.amp)
    doc = load_datalist(dl_path)
    items = split_items(doc, p.split, need_labels=True, path=dl_path)
    channels = list(doc.get("channels") or [])
    if model.channels and channels and model.channels != channels:
        raise StageError(f"the checkpoint was trained on channels {model.channels}, the datalist has {channels}")
    class_names = model.classes
    ds = make_dataset(items, p.eval_transforms if p.eval_transforms is not None else model.eval_transforms, "none")
    ref_name = p.overlay_channel or doc.get("reference") or (channels[-1] if channels else None)
    show = channels.index(ref_name) if ref_name in channels else len(channels) - 1 if channels else 0
    if p.overlay_channel and p.overlay_channel not in channels:
        raise StageError(f"overlay_channel {p.overlay_channel!r} is not one of the channels {channels}")

    rows: list[dict[str, Any]] = []
    cases: list[CaseScores] = []
    overlays_dir = ctx.stage_dir / "overlays"
    t0 = time.perf_counter()
    multiclass = len(class_names) > 1
    with ctx.progress(f"Evaluating on {p.split}", len(items)) as advance:
        for i, item in enumerate(items):
            try:
                data = ds[i]
                truth_raw = read_voxels(item["label"])
            except Exception as exc:
                raise StageError(f"case {item.get('patient_id')}: cannot be loaded ({type(exc).__name__}: {exc})"
                                 ) from exc
            grid = read_grid(item["label"])
            pred = model.segment(data, grid, tta=p.tta).mask
            truth = map_labels(truth_raw, model.labels).astype(np.uint8)
            case = score_case(pred, truth, sorted(class_names), grid.spacing, p.hd95)
            cases.append(case)
            row: dict[str, Any] = {
                "patient_id": item.get("patient_id"), "study_uid": item.get("study_uid"),
                "has_tumour": int(case.truth_has), "dice_whole_tumour": finite_or_none(case.whole[0]),
                "hd95_whole_tumour": finite_or_none(case.whole[1], 3),
                "truth_ml": round(case.truth_ml, 3), "pred_ml": round(case.pred_ml, 3),
            }
            if multiclass:
                for c, (d, h) in case.per_class.items():
                    key = class_names[c].replace(" ", "_")
                    row[f"dice_{key}"] = finite_or_none(d)
                    row[f"hd95_{key}"] = finite_or_none(h, 3)
            rows.append(row)
            if i < p.overlays:
                image = read_voxels(item["image"][show] if isinstance(item["image"], list) else item["image"])
                image = image.astype(np.float32, copy=False)
                if image.ndim == 4:
                    image = image[..., 0]
                dtxt = "n/a (no tumour)" if math.isnan(case.whole[0]) else f"{case.whole[0]:.3f}"
                overlay_png(image, truth, pred, grid.affine, overlays_dir / f"{case_name(item)}.png",
                            f"{item.get('patient_id')}  {ref_name or ''}  whole-tumour Dice {dtxt}")
            ctx.log.info("%s: whole-tumour Dice %s, HD95 %s mm (truth %.1f mL, predicted %.1f mL)",
                         item.get("patient_id"), row["dice_whole_tumour"], row["hd95_whole_tumour"],
                         row["truth_ml"], row["pred_ml"])
            advance(1)
    seconds = time.perf_counter() - t0

    metrics = summarise(cases, class_names, seed=ctx.seed, n_boot=p.bootstrap)
    per_label = metrics.pop("per_label")
    metrics.update(tta=p.tta, split=p.split, per_label=per_label)
    if not metrics["n_with_tumour"]:
        ctx.log.warning("no case of the %s split has tumour in its ground truth: dice is undefined", p.split)
    write_csv_atomic(ctx.stage_dir / "cases.csv", rows, list(rows[0]) if rows else ["patient_id"])
    write_text_atomic(ctx.stage_dir / "summary.json", json.dumps({**metrics, "checkpoint": str(ckpt_path),
                                                                  "datalist": str(dl_path)}, indent=1) + "\n")
    ctx.log.info("%s split: whole-tumour Dice %s (95%% CI %s) on %d cases with tumour; HD95 %s mm; %d false "
                 "positive(s) on %d tumour-free cases; %.1f s", p.split, metrics["dice"],
                 metrics["dice_ci95"], metrics["n_with_tumour"], metrics["hd95"], metrics["false_positive_cases"],
                 metrics["n_cases"] - metrics["n_with_tumour"], seconds)
    return StageResult(metrics=metrics, outputs={"evaluation": str(ctx.stage_dir / "cases.csv")},
                       inputs={str(ckpt_path): sha256_file(ckpt_path)})

