"""Stage ``evaluate``: score a trained segmenter on held-out studies, on their source grid.

The checkpoint (or the fold checkpoints of a k-fold ``train_segmenter``: their ensemble) is loaded
once; every study of the split (default ``test``) goes through the eval transforms stored in the
checkpoint, sliding-window inference, optional flip test-time augmentation and optional removal of
small connected components, and back onto the reference volume's grid, where it is compared with the
label map as the dataset stage wrote it (never resampled). TTA and post-processing default to the
model's settings (the training stage's ``package:`` options), so ``predict`` and ``medpipe score``
write the masks this stage scores; the settings used are given to later stages (``inference.json``),
and ``predict`` follows them unless told otherwise. Per case and per class: Dice and HD95 (mm) with
``monai.metrics``; for multiclass models also the whole tumour (every class > 0). The work is
:func:`medpipe.inference.evaluation.score_cases`.

Outputs in the stage folder: ``cases.csv`` (one row per case), ``overlays/*.png`` (image, ground
truth outlined in sky blue, prediction in dashed orange, on the slice with most tumour),
``inference.json`` and ``summary.json``; for a model with several classes (organs, tumour sub-regions)
also ``per_label.csv`` (one row per class: Dice and HD95 with their CIs, case counts, false positive
and missed cases) and ``per_label.png`` (the same as a chart). Metrics::

    dice            mean whole-tumour Dice over the cases whose ground truth has tumour
    dice_ci95       its bootstrap 95 % confidence interval (cases resampled, seeded by the run's seed);
                    null (undefined) with fewer than two such cases
    hd95, hd95_ci95 the same for HD95 in mm (cases where truth and prediction are both non-empty)
    dice_all_cases  mean Dice over every case, an empty prediction on an empty truth counting as 1
    false_positive_cases  tumour-free cases with any voxel predicted as tumour
    per_label       {class name: {dice, dice_ci95, hd95, hd95_ci95, n, n_hd95, false_positive_cases,
                    missed_cases}}: per class as above (n: cases whose truth has the class; n_hd95: of
                    them, those with the class predicted; false_positive_cases: cases whose truth lacks
                    the class and whose prediction has it; missed_cases: the reverse)

With several classes, "tumour" in the names above stands for "any class" (every label > 0: for organs,
the whole labelled anatomy); the per-class figures are in ``per_label``.

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
from medpipe.data.transforms import TransformList
from medpipe.errors import StageError
from medpipe.inference.evaluation import score_cases
from medpipe.inference.segmentation import SegmentationModel
from medpipe.io import sha256_file, write_csv_atomic, write_text_atomic
from medpipe.metrics.segmentation import PER_LABEL_COLUMNS, CaseScores, format_ci, per_label_rows, summarise
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage


class EvaluateParams(StageParams):
    checkpoint: InputPath | list[InputPath] | None = Field(
        None, description="None: the train_segmenter stage's checkpoint(s) (several: their ensemble)")
    datalist: InputPath | None = Field(None, description="None: the datalist the previous stages used")
    split: Literal["train", "val", "test"] = "test"
    eval_transforms: TransformList | None = Field(None, description="None: those stored in the checkpoint")
    tta: bool | None = Field(None, description="average over flips along each axis (test-time augmentation); "
                                               "None: the model's setting (the training stage's package.tta)")
    min_component_ml: float | None = Field(None, ge=0.0, le=1e6,
                                           description="remove foreground components below this volume (mL); "
                                                       "None: the model's setting, 0: none")
    hd95: bool = True
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for the 95 % confidence intervals")
    overlays: int = Field(4, ge=0, description="how many cases get a PNG overlay")
    overlay_channel: str | None = Field(None, description="channel shown in overlays; None: the reference channel")


def checkpoint_list(value: str | list[str] | None) -> list[str] | None:
    """A ``checkpoint`` parameter as a list (or None)."""
    return [value] if isinstance(value, str) else value


@stage("evaluate", EvaluateParams,
       needs=(Need("checkpoint", params=("checkpoint",)), Need("datalist", params=("datalist",))),
       gives=("evaluation", "inference"))
def evaluate(ctx: RunContext, p: EvaluateParams) -> StageResult:
    from medpipe.data.volumes import read_voxels
    from medpipe.report.segmentation_plots import overlay_png, per_label_png

    ckpt_paths = ctx.inputs("checkpoint", checkpoint_list(p.checkpoint), "checkpoint")
    dl_path = ctx.input("datalist", p.datalist)
    model = SegmentationModel.load(ckpt_paths, ctx.device, ctx.amp)
    doc = load_datalist(dl_path)
    items = split_items(doc, p.split, need_labels=True, path=dl_path)
    channels = list(doc.get("channels") or [])
    if model.channels and channels and model.channels != channels:
        raise StageError(f"the checkpoint was trained on channels {model.channels}, the datalist has {channels}")
    class_names = model.classes
    whole = "whole-tumour" if len(class_names) == 1 else "any-class"
    settings = model.settings(p.tta, p.min_component_ml)
    ref_name = p.overlay_channel or doc.get("reference") or (channels[-1] if channels else None)
    show = channels.index(ref_name) if ref_name in channels else len(channels) - 1 if channels else 0
    if p.overlay_channel and p.overlay_channel not in channels:
        raise StageError(f"overlay_channel {p.overlay_channel!r} is not one of the channels {channels}")

    rows: list[dict[str, Any]] = []
    cases: list[CaseScores] = []
    overlays_dir = ctx.stage_dir / "overlays"
    t0 = time.perf_counter()
    with ctx.progress(f"Evaluating on {p.split}", len(items)) as advance:
        for i, res in enumerate(score_cases(model, items, transforms=p.eval_transforms, tta=settings["tta"],
                                            min_component_ml=settings["min_component_ml"] or 0, hd95=p.hd95)):
            item, case, row = res.item, res.scores, res.row
            cases.append(case)
            rows.append(row)
            if i < p.overlays:
                image = read_voxels(item["image"][show] if isinstance(item["image"], list) else item["image"])
                image = image.astype(np.float32, copy=False)
                if image.ndim == 4:
                    image = image[..., 0]
                dtxt = "n/a (no label)" if math.isnan(case.whole[0]) else f"{case.whole[0]:.3f}"
                overlay_png(image, res.truth, res.mask, res.grid.affine, overlays_dir / f"{case_name(item)}.png",
                            f"{item.get('patient_id')}  {ref_name or ''}  {whole} Dice {dtxt}")
            ctx.log.info("%s: %s Dice %s, HD95 %s mm (truth %.1f mL, predicted %.1f mL)%s",
                         item.get("patient_id"), whole, row["dice_whole_tumour"], row["hd95_whole_tumour"],
                         row["truth_ml"], row["pred_ml"], _per_class_text(case.per_class, class_names))
            advance(1)
    seconds = time.perf_counter() - t0

    metrics = summarise(cases, class_names, seed=ctx.seed, n_boot=p.bootstrap)
    per_label = metrics.pop("per_label")
    metrics.update(tta=settings["tta"], min_component_ml=settings["min_component_ml"], split=p.split,
                   ensemble_size=len(ckpt_paths), per_label=per_label)
    if not metrics["n_with_tumour"]:
        ctx.log.warning("no case of the %s split has tumour in its ground truth: dice is undefined", p.split)
    write_csv_atomic(ctx.stage_dir / "cases.csv", rows, list(rows[0]) if rows else ["patient_id"])
    if len(class_names) > 1:
        write_csv_atomic(ctx.stage_dir / "per_label.csv", per_label_rows(per_label), list(PER_LABEL_COLUMNS))
        per_label_png(per_label, ctx.stage_dir / "per_label.png",
                      f"{p.split} split, {metrics['n_cases']} cases: per-class Dice and HD95")
        for name, m in per_label.items():
            ctx.log.info("%s: Dice %s (95%% CI %s, %d cases), HD95 %s mm (95%% CI %s)", name, m["dice"],
                         format_ci(m["dice_ci95"]), m["n"], m["hd95"], format_ci(m["hd95_ci95"]))
    write_text_atomic(ctx.stage_dir / "summary.json", json.dumps(
        {**metrics, "checkpoint": [str(c) for c in ckpt_paths], "datalist": str(dl_path)}, indent=1) + "\n")
    inference = ctx.stage_dir / "inference.json"
    write_text_atomic(inference, json.dumps({"tta": settings["tta"], "min_component_ml": settings["min_component_ml"]},
                                            indent=1) + "\n")
    ctx.log.info("%s split: %s Dice %s (95%% CI %s) on %d cases with a label; HD95 %s mm; %d false "
                 "positive(s) on %d label-free cases; %s%.1f s", p.split, whole, metrics["dice"],
                 format_ci(metrics["dice_ci95"]), metrics["n_with_tumour"], metrics["hd95"],
                 metrics["false_positive_cases"], metrics["n_cases"] - metrics["n_with_tumour"],
                 "flip TTA; " if settings["tta"] else "", seconds)
    return StageResult(metrics=metrics, outputs={"evaluation": str(ctx.stage_dir / "cases.csv"),
                                                 "inference": str(inference)},
                       inputs={str(c): sha256_file(c) for c in ckpt_paths})


def _per_class_text(per_class: dict[int, tuple[float, float]], names: dict[int, str]) -> str:
    """``; Dice per class: lungs 0.97, heart 0.91, ...`` for a case of a model with several classes."""
    if len(names) < 2:
        return ""
    return "; Dice per class: " + ", ".join(
        f"{names[c]} {'n/a' if math.isnan(d) else f'{d:.3f}'}" for c, (d, _) in per_class.items())
