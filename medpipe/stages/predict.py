"""Stage ``predict``: segment new series with a trained segmenter; masks as NIfTI on the source grid.

Inputs, one of:

* a datalist split (default: the dataset stage's datalist, split ``test``); labels are ignored;
* ``ingest_dir``: every study of an ingest folder whose series match the channel rules (the dataset
  stage's rules and code: ``channels``, ``reference``; default: the dataset stage's defaults), e.g. a
  new PACS export ingested with ``medpipe ingest``.

Each study goes through the eval transforms stored in the checkpoint, sliding-window inference
(optional flip test-time augmentation, ``tta``), and its class probabilities are resampled back onto
the reference series' volume (the grid and affine of the NIfTI that ingest wrote), where the argmax
is taken and, optionally, foreground components below ``min_component_ml`` are removed. A k-fold
``train_segmenter`` gives one checkpoint per fold: their ensemble (mean probabilities) predicts.

**The same masks as ``evaluate``.** ``tta`` and ``min_component_ml`` unset: the settings the
``evaluate`` stage before this one used (its ``inference.json``), else the model's own (the training
stage's ``package:`` options, which ``medpipe score`` uses too). So the masks written are the masks
scored. Output: ``predictions/<patient>_<study hash>.nii.gz`` (uint8 class map, same shape and
affine as the reference volume) and ``predictions.csv`` (one row per study: UIDs, reference volume,
mask, predicted volume per class in mL). Optionally ``*_prob.nii.gz`` (float32 foreground probability).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from medpipe.data.channels import ChannelRule
from medpipe.data.datalist import case_name, load_datalist, split_items
from medpipe.data.transforms import TransformList, tolerate_missing_keys
from medpipe.errors import StageError
from medpipe.inference.segmentation import SegmentationModel
from medpipe.io import sha256_file, write_csv_atomic
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage
from medpipe.stages.evaluate import checkpoint_list


class PredictParams(StageParams):
    checkpoint: InputPath | list[InputPath] | None = Field(
        None, description="None: the train_segmenter stage's checkpoint(s) (several: their ensemble)")
    datalist: InputPath | None = Field(None, description="None: the datalist the previous stages used (unless "
                                                         "ingest_dir is set)")
    split: Literal["train", "val", "test", "all"] = "test"
    ingest_dir: InputPath | None = Field(None, description="predict every matching study of this ingest folder instead")
    channels: dict[str, ChannelRule] | None = Field(None, description="with ingest_dir; None: the dataset defaults")
    reference: str | None = Field(None, description="with ingest_dir: the grid channel; None: FLAIR / the last one")
    eval_transforms: TransformList | None = Field(None, description="None: those stored in the checkpoint")
    tta: bool | None = Field(None, description="average over flips along each axis (test-time augmentation); None: "
                                               "as the evaluate stage before, else the model's setting")
    min_component_ml: float | None = Field(None, ge=0.0, le=1e6,
                                           description="remove foreground components below this volume (mL); None: "
                                                       "as the evaluate stage before, else the model's; 0: none")
    probabilities: bool = Field(False, description="also write the foreground probability map")


def _items_from_ingest(ctx: RunContext, p: PredictParams, ingest_dir: Path, channel_names: list[str]
                       ) -> tuple[list[dict[str, Any]], Path]:
    """Unlabelled items of every usable study in ``ingest_dir``, built by the datalist builder.

    The items (and the studies skipped, with reasons) are also written to ``inputs/datalist.json``.
    """
    from medpipe.data.channels import DEFAULT_CHANNELS
    from medpipe.data.datalist_builder import build_items, datalist_document, write_datalist

    rules = p.channels if p.channels is not None else {n: DEFAULT_CHANNELS[n] for n in channel_names
                                                       if n in DEFAULT_CHANNELS}
    if list(rules) != channel_names:
        raise StageError(f"channels: the checkpoint expects channels {channel_names} in this order; "
                         f"give a rule for each ({list(rules)} given)")
    reference = p.reference or ("FLAIR" if "FLAIR" in rules else channel_names[-1])
    if reference not in rules:
        raise StageError(f"reference: {reference!r} is not one of the channels {list(rules)}")
    work = ctx.stage_dir / "inputs"
    result = build_items(ingest_dir, rules, reference, None, work_dir=work, log=ctx.log, progress=ctx.progress)
    if not result.items:
        raise StageError(result.why_empty(ingest_dir))
    path = work / "datalist.json"
    write_datalist(path, datalist_document(result, channels=list(rules), reference=reference, ingest_dir=ingest_dir,
                                           seed=ctx.seed, val=0.0, test=0.0, stratify=False))
    ctx.log.info("%d studies of %s to predict, %d skipped", len(result.items), ingest_dir, len(result.skipped))
    return result.items, path


def _settings(ctx: RunContext, p: PredictParams, model: SegmentationModel) -> tuple[dict[str, Any], str]:
    """(tta and min_component_ml to use, where they come from)."""
    tta, min_ml, origin = p.tta, p.min_component_ml, "set here"
    evaluated = ctx.artifacts.get("inference")
    if (tta is None or min_ml is None) and evaluated:
        try:
            doc = json.loads(Path(evaluated).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StageError(f"cannot read the evaluate stage's inference settings {evaluated} ({exc})") from exc
        tta = bool(doc.get("tta", False)) if tta is None else tta
        min_ml = (doc.get("min_component_ml") or 0.0) if min_ml is None else min_ml
        origin = "as evaluate" if (p.tta, p.min_component_ml) == (None, None) else "partly as evaluate"
    elif tta is None and min_ml is None:
        origin = "the model's"
    return model.settings(tta, min_ml), origin


@stage("predict", PredictParams,
       needs=(Need("checkpoint", params=("checkpoint",)), Need("datalist", params=("datalist", "ingest_dir")),
              Need("inference", optional=True)),
       gives=("masks",))
def predict(ctx: RunContext, p: PredictParams) -> StageResult:
    from medpipe.data.datasets import make_dataset
    from medpipe.data.volumes import read_grid, write_nifti

    ckpt_paths = ctx.inputs("checkpoint", checkpoint_list(p.checkpoint), "checkpoint")
    model = SegmentationModel.load(ckpt_paths, ctx.device, ctx.amp)
    settings, origin = _settings(ctx, p, model)
    ctx.log.info("predicting with %d model(s), %s, minimum component %s (%s)", len(ckpt_paths),
                 "flip TTA" if settings["tta"] else "no TTA", f"{settings['min_component_ml']} mL"
                 if settings["min_component_ml"] else "none", origin)
    channel_names = model.channels
    inputs = {str(c): sha256_file(c) for c in ckpt_paths}
    if p.ingest_dir is not None:
        src = Path(p.ingest_dir).expanduser().resolve()
        if not src.is_dir():
            raise StageError(f"ingest_dir: {src} is not a folder")
        items, source = _items_from_ingest(ctx, p, src, channel_names)
    else:
        source = ctx.input("datalist", p.datalist)
        doc = load_datalist(source)
        if channel_names and doc.get("channels") and list(doc["channels"]) != channel_names:
            raise StageError(f"the checkpoint was trained on channels {channel_names}, "
                             f"the datalist has {doc['channels']}")
        items = split_items(doc, p.split, need_labels=False, path=source)
        inputs[str(source)] = sha256_file(source)
    spec = tolerate_missing_keys(p.eval_transforms if p.eval_transforms is not None else model.eval_transforms)
    unlabelled = [{k: v for k, v in it.items() if k not in ("label", "class")} for it in items]
    ds = make_dataset(unlabelled, spec, "none")
    classes = model.classes

    out_dir = ctx.stage_dir / "predictions"
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with ctx.progress("Predicting", len(items)) as advance:
        for i, item in enumerate(items):
            ref = item.get("reference_volume") or (item["image"][-1] if isinstance(item["image"], list) else item["image"])
            try:
                data = ds[i]
                grid = read_grid(ref)
            except Exception as exc:
                raise StageError(f"study {item.get('study_uid')} of {item.get('patient_id')}: cannot be loaded "
                                 f"({type(exc).__name__}: {exc})") from exc
            result = model.segment(data, grid, tta=settings["tta"], min_component_ml=settings["min_component_ml"] or 0)
            mask = result.mask
            name = case_name(item)
            mask_path = out_dir / f"{name}.nii.gz"
            write_nifti(mask, grid.affine, mask_path)
            voxel_ml = float(np.prod(grid.spacing)) / 1000.0
            row: dict[str, Any] = {
                "patient_id": item.get("patient_id"), "study_uid": item.get("study_uid"),
                "reference_series_uid": item.get("reference_series_uid"), "reference_volume": str(ref),
                "mask": str(mask_path),
                "foreground_ml": round(float((mask > 0).sum()) * voxel_ml, 3),
            }
            if settings["min_component_ml"]:
                row["removed_components"] = result.removed_components
            if len(classes) > 1:
                for c, cname in classes.items():
                    row[f"{cname.replace(' ', '_')}_ml"] = round(float((mask == c).sum()) * voxel_ml, 3)
            if p.probabilities:
                prob_path = out_dir / f"{name}_prob.nii.gz"
                write_nifti((1.0 - result.probabilities[0]).astype(np.float32), grid.affine, prob_path)
                row["probability"] = str(prob_path)
            rows.append(row)
            ctx.log.info("%s: %.1f mL predicted -> %s", item.get("patient_id"), row["foreground_ml"], mask_path)
            advance(1)
    write_csv_atomic(ctx.stage_dir / "predictions.csv", rows, list(rows[0]))
    seconds = time.perf_counter() - t0
    ctx.log.info("%d studies segmented in %.1f s -> %s", len(rows), seconds, out_dir)
    return StageResult(outputs={"masks": str(out_dir)},
                       metrics={"n_predicted": len(rows), "predict_seconds": round(seconds, 2),
                                "predict_tta": settings["tta"], "predict_min_component_ml": settings["min_component_ml"],
                                "predict_ensemble_size": len(ckpt_paths)}, inputs=inputs)
