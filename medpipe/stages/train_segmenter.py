"""Stage ``train_segmenter``: a 3D MONAI UNet / SegResNet trained on the datalist's train split.

Dice + cross-entropy loss (``monai.losses.DiceCELoss``) on patches that the train transforms cut
(positive / negative sampling with ``RandCropByPosNegLabeld``: its ``num_samples``, ``pos`` and
``neg`` are set in the transform list), sliding-window validation (``monai.inferers``) with
``monai.metrics.DiceMetric`` on the val split every ``val_every`` epochs, the best checkpoint kept
(written atomically), early stopping after ``patience`` epochs without a better validation Dice, a
progress bar, one log line per epoch, ``history.csv`` and a loss / validation-Dice curve
(``curve.png``). On CUDA it trains in mixed precision (``amp: auto``). The loop is
:func:`medpipe.training.loop.fit`; this module only wires the data, network and outputs to it.

The checkpoint (``checkpoint.pt``, readable with ``torch.load(weights_only=True)``) holds the
weights, the network configuration (:class:`medpipe.models.segmentation.SegmenterConfig`), the
classes and label mapping, the channel names, ``roi_size`` and the eval transforms, so ``evaluate``
and ``predict`` need nothing else.

Validation Dice is the mean over val cases of the mean foreground-class Dice, over the cases whose
ground truth has that class (tumour-free cases are not averaged in, as in ``evaluate``); when no val
case has any foreground, an empty prediction on an empty truth counts as 1.

**Selection** (``select``): the checkpoint with the best validation Dice (``dice``), the lowest
validation loss (``loss``: Dice + cross-entropy on the val cases, which also penalises confident
over-segmentation), or the last epoch's (``last``). The options of
:mod:`medpipe.training.selection` apply: ``select_window`` (the metric averaged over the last N
validations), ``min_epochs`` (no checkpoint kept earlier), ``average: ema | swa`` (averaged weights
are validated and kept; they are in the resume snapshot too). A checkpoint chosen on fewer than 5
validation cases is warned about.

**Cross-validation** (``folds: k``, as ``train_classifier``'s): the datalist's train and val patients
are pooled and dealt into k patient folds stratified by label presence (a patient whose label maps
have foreground or not); model i trains on the other folds and is selected on fold i
(``checkpoint_fold<i>.pt``). Then every pooled case is predicted by the model that never saw it, with
the model's inference settings (``package.tta``, ``package.min_component_ml``, ``package.components``):
the out-of-fold masks (``oof/<case>.nii.gz``), ``oof.csv`` (per case: fold, Dice, HD95, volumes) and
``crossval.json`` (per fold and pooled: Dice and HD95 with bootstrap CIs). Metrics ``cv_dice`` (pooled
over every out-of-fold case with foreground) with ``cv_dice_ci95``, ``cv_dice_folds`` (per fold) and
``cv_dice_mean`` ± ``cv_dice_sd`` (over folds). The k checkpoints are the ensemble (mean
probabilities) that ``evaluate``, ``predict`` and the model package (so ``medpipe score``) use: the
nnU-Net practice.

The stage gives the datalist it trained on, so ``evaluate`` and ``predict`` use it by default.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from medpipe.data.datalist import case_name, load_datalist, split_items
from medpipe.data.labels import Target, label_info, n_classes
from medpipe.data.transform_defaults import segmenter_eval_transforms, segmenter_train_transforms
from medpipe.data.transforms import TransformList, set_random_state
from medpipe.errors import StageError
from medpipe.inference.checkpoint import write_segmenter_checkpoint
from medpipe.inference.package import SegmenterPackageOptions, build_segmenter_package
from medpipe.io import sha256_file, write_csv_atomic, write_text_atomic
from medpipe.metrics.segmentation import format_ci
from medpipe.models.segmentation import SegmenterName, SegmenterOptions
from medpipe.stage import InputPath, LabelValue, Need, OutputPath, RunContext, Size, StageParams, StageResult, stage
from medpipe.training.selection import FEW_VALIDATION_CASES, SelectionOptions


class TrainSegmenterParams(StageParams, SegmenterOptions, SelectionOptions):
    """The network options (``channels``, ``strides``, ``num_res_units``, ``norm``, ``dropout``) come from
    :class:`~medpipe.models.segmentation.SegmenterOptions`, the selection options (``select_window``,
    ``min_epochs``, ``average``, ...) from :class:`~medpipe.training.selection.SelectionOptions`."""

    datalist: InputPath | None = Field(None, description="datalist.json; None: the dataset stage's output")
    model: SegmenterName = "unet"
    roi_size: tuple[Size, Size, Size] = Field((64, 64, 32), description="sliding-window size (voxels)")
    batch_size: int = Field(2, ge=1, description="items per step (each gives num_samples patches)")
    epochs: int = Field(100, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    batch_dice: bool = Field(False, description="Dice loss over the whole batch, not per patch (steadier when "
                                                "patches without foreground are sampled)")
    target: Target = Field("whole_tumor", description="whole_tumor: label > 0; multiclass: one class per label")
    label_map: dict[LabelValue, LabelValue] | None = Field(None, description="multiclass: label value -> class (others: 0)")
    train_transforms: TransformList | None = Field(None, description="None: segmenter_train_transforms(roi_size)")
    eval_transforms: TransformList | None = Field(None, description="None: segmenter_eval_transforms()")
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: OutputPath | None = Field(None, description="disk cache folder; None: <run dir>/cache")
    val_every: int = Field(5, ge=1)
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better checkpoint")
    select: Literal["dice", "loss", "last"] = Field("dice", description="keep the checkpoint with the best validation "
                                                                        "Dice, the lowest validation loss, or the last")
    folds: int | None = Field(None, ge=2, le=100, description="k-fold cross-validation over the train + val patients; "
                                                              "the k models are the ensemble")
    amp: bool | Literal["auto"] = Field("auto", description="mixed precision; auto: on CUDA")
    snapshot_every: float = Field(30.0, ge=0.0, le=86400.0,
                                  description="seconds between training snapshots, from which --resume continues an "
                                              "interrupted run (0: after every epoch)")
    sw_batch_size: int = Field(4, ge=1)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    package: SegmenterPackageOptions = Field(default_factory=SegmenterPackageOptions,
                                             description="the model package written to <stage>/model")

    @model_validator(mode="after")
    def _fill(self) -> TrainSegmenterParams:
        if self.label_map is not None and self.target != "multiclass":
            raise ValueError("label_map is used with target: multiclass only")
        if self.average != "none" and self.norm == "batch":
            raise ValueError(f"average: {self.average} needs norm: instance or group (the batch-norm statistics of the "
                             "training weights do not fit averaged weights)")
        if self.train_transforms is None:
            self.train_transforms = segmenter_train_transforms(self.roi_size)
        if self.eval_transforms is None:
            self.eval_transforms = segmenter_eval_transforms()
        return self


@stage("train_segmenter", TrainSegmenterParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("checkpoint", "model", "datalist"), distributed=True)
def train_segmenter(ctx: RunContext, p: TrainSegmenterParams) -> StageResult:
    from medpipe.report.training_plots import curve_png
    from medpipe.training.classification import kfold_items
    from medpipe.training.segmentation import has_foreground

    t_start = time.perf_counter()
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    train_items = split_items(doc, "train", need_labels=True, path=dl_path)
    if p.folds is None:
        val_items = split_items(doc, "val", need_labels=True, path=dl_path)
    else:
        val_items = [it for it in doc.get("val", []) if it.get("label")]
    channels = list(doc.get("channels") or [])
    first = train_items[0]["image"]
    in_channels = len(channels) or (len(first) if isinstance(first, list) else 1)
    info = label_info(p.target, p.label_map, doc.get("label_names"))
    try:
        folds = kfold_items(train_items, val_items, p.folds, ctx.seed, stratum=has_foreground)
    except StageError as exc:
        raise StageError(f"folds: {exc}") from exc
    ckpts: list[Path] = []
    history: list[dict[str, Any]] = []
    fold_metrics: list[dict[str, Any]] = []
    with ctx.progress(f"Training {p.model}" + (f" ({len(folds)} folds)" if len(folds) > 1 else ""),
                      p.epochs * len(folds)) as advance:
        for i, (fold_train, fold_val) in enumerate(folds):
            if not fold_val:
                raise StageError(f"fold {i} has no validation case; use fewer folds")
            ckpt = ctx.stage_dir / (f"checkpoint_fold{i}.pt" if len(folds) > 1 else "checkpoint.pt")
            m, rows = _train_one(ctx, p, dl_path=dl_path, train=fold_train, val=fold_val, channels=channels,
                                 in_channels=in_channels, info=info, ckpt=ckpt, fold=i if len(folds) > 1 else None,
                                 advance=advance)
            ckpts.append(ckpt)
            history += rows
            fold_metrics.append(m)
    if not ctx.dist.is_main:  # a rank of a distributed run: rank 0 writes everything that follows
        return StageResult()
    columns = ["epoch", "loss", "val_dice", "val_loss", "lr", "seconds"]
    write_csv_atomic(ctx.stage_dir / "history.csv", history, ["fold", *columns] if len(folds) > 1 else columns)
    best = [m["best_val_dice"] for m in fold_metrics]
    title = (f"{p.model} {list(p.channels)}: best val Dice {best[0]:.3f} (epoch {fold_metrics[0]['best_epoch']})"
             if len(folds) == 1 else f"{p.model} {list(p.channels)}, {len(folds)} folds: best val Dice "
             + ", ".join(f"{b:.3f}" for b in best))
    curve_png(history, ctx.stage_dir / "curve.png", title, metric="val_dice", metric_label="validation Dice",
              losses={"loss": "train loss (Dice + CE)"}, group="fold" if len(folds) > 1 else None)
    metrics: dict[str, Any] = {
        "best_val_dice": round(float(np.mean(best)), 6),
        "best_epoch": fold_metrics[0]["best_epoch"] if len(folds) == 1 else [m["best_epoch"] for m in fold_metrics],
        "epochs_run": fold_metrics[0]["epochs"] if len(folds) == 1 else [m["epochs"] for m in fold_metrics],
        "stopped_early": fold_metrics[0]["stopped_early"] if len(folds) == 1 else
        [m["stopped_early"] for m in fold_metrics],
        "train_seconds": round(sum(m["seconds"] for m in fold_metrics), 2),
    }
    crossval = None
    if len(folds) > 1:
        crossval = _cross_validate(ctx, ckpts, [fv for _, fv in folds])
        metrics.update({k: v for k, v in crossval.items() if k.startswith("cv_")})
    codes = {k: v.model_dump() for k, v in (p.package.segment_codes or {}).items()}
    pkg = build_segmenter_package(
        ctx.stage_dir / "model", ckpts, dl_path, name=p.package.name or f"{ctx.run_dir.name} {ctx.stage_dir.name}",
        tta=p.package.tta, min_component_ml=p.package.min_component_ml, segment_codes=codes,
        training={"seed": ctx.seed, "stage": ctx.stage_dir.name, "intended_use": p.package.intended_use,
                  "selection": {"select": p.select, "select_window": p.select_window, "min_epochs": p.min_epochs,
                                "average": p.average},
                  **({"cross_validation": {k: v for k, v in crossval.items() if k.startswith("cv_")}}
                     if crossval else {})})
    ctx.log.info("model package %s (%d member%s) -> %s", pkg.version, len(ckpts), "s" if len(ckpts) > 1 else "",
                 pkg.path)
    metrics["train_stage_seconds"] = round(time.perf_counter() - t_start, 2)
    return StageResult(
        outputs={"checkpoint": str(ckpts[0]) if len(ckpts) == 1 else [str(c) for c in ckpts],
                 "model": str(pkg.path), "datalist": str(dl_path)},
        metrics=metrics,
        inputs={str(dl_path): sha256_file(dl_path)},
    )


def _train_one(ctx: RunContext, p: TrainSegmenterParams, *, dl_path: Path, train: list[dict[str, Any]],
               val: list[dict[str, Any]], channels: list[str], in_channels: int, info: dict[str, Any], ckpt: Path,
               fold: int | None, advance: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one model (the model, or fold ``fold``'s); return (metrics, history rows)."""
    import torch
    from monai.data import DataLoader

    from medpipe.data.datasets import make_dataset
    from medpipe.models.segmentation import build_from_config, segmenter_config
    from medpipe.training import ddp
    from medpipe.training.loop import SupervisedStep, Validation, fit, resolve_amp
    from medpipe.training.losses import segmenter_loss
    from medpipe.training.resume import Snapshot
    from medpipe.training.segmentation import segmenter_batches, segmenter_validation

    train_spec = p.train_transforms or segmenter_train_transforms(p.roi_size)  # both filled by the validator
    eval_spec = p.eval_transforms or segmenter_eval_transforms()
    seed = ctx.seed + (fold or 0)
    label = "" if fold is None else f"fold {fold} "
    if fold is not None:
        torch.manual_seed(seed)
    if len(val) < FEW_VALIDATION_CASES:
        ctx.log.warning("%sthe checkpoint is chosen on %d validation case(s): with fewer than %d the choice is noise "
                        "(use %sselect_window, average: ema / swa, select: loss or last, min_epochs)",
                        label.rstrip() + ": " if label else "", len(val), FEW_VALIDATION_CASES,
                        "fewer folds, " if fold is not None else "folds, ")
    try:
        cfg = segmenter_config(p.model, in_channels, n_classes(info),
                               **p.model_dump(include=set(SegmenterOptions.model_fields)))
        net = build_from_config(cfg)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    device, dist = ctx.device, ctx.dist
    amp = resolve_amp(p.amp, ctx.amp, device)
    net.to(device)
    model = ddp.wrap(net, dist)  # what trains; ``net`` holds its weights
    ctx.log.info("%s%s %s: %d inputs (%s), %d classes (%s), %.2fM parameters, on %s%s (%d CPU threads)", label,
                 p.model, cfg["channels"], in_channels, ", ".join(channels), n_classes(info), info["target"],
                 sum(t.numel() for t in net.parameters()) / 1e6, device, " with mixed precision" if amp else "",
                 torch.get_num_threads())

    cache_dir = Path(p.cache_dir).expanduser().resolve() if p.cache_dir else ctx.run_dir / "cache"
    t0 = time.perf_counter()
    try:
        train_ds = make_dataset(ddp.cached_items(train, p.cache, dist, seed), train_spec, p.cache, cache_dir)
        val_ds = make_dataset(ddp.shard(val, dist), eval_spec, p.cache, cache_dir)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot load the training data ({type(exc).__name__}: {exc}); check the transforms "
                         "and the datalist") from exc
    set_random_state(train_ds.transform, dist.rank_seed(seed))
    ctx.log.info("%sdata: %d train, %d val studies (cache %s, %.1f s)%s", label, len(train), len(val), p.cache,
                 time.perf_counter() - t0, f"; {len(train_ds)} train and {len(val_ds)} val on each of "
                 f"{dist.world_size} ranks" if dist.enabled else "")
    epoch_start = None
    if dist.enabled:
        loader, epoch_start, _ = ddp.train_loader(train_ds, batch_size=p.batch_size, seed=seed, dist=dist,
                                                  partitioned=p.cache == "memory",
                                                  pin_memory=device.startswith("cuda"))
    else:
        loader = DataLoader(train_ds, batch_size=p.batch_size, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(seed), pin_memory=device.startswith("cuda"))
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.lr * 0.02) \
        if p.lr_schedule == "cosine" else None
    average = p.weight_average(net, p.epochs)
    kept_net = average.module if average is not None else net  # what is validated and kept

    def save(epoch: int, v: Validation) -> None:
        write_segmenter_checkpoint(
            ckpt, net=kept_net, model=cfg, labels=info, channels=channels, roi_size=list(p.roi_size),
            eval_transforms=eval_spec, sw_batch_size=p.sw_batch_size, overlap=p.overlap,
            record={"epoch": epoch, "val_dice": v.row["val_dice"], "val_loss": v.row.get("val_loss"),
                    "datalist": str(dl_path), "seed": ctx.seed, "fold": fold, "select": p.select,
                    "average": p.average,
                    "inference": {"tta": p.package.tta, "min_component_ml": p.package.min_component_ml,
                                  "components": p.package.components,
                                  "min_component_fraction": p.package.min_component_fraction}})

    validate = segmenter_validation(kept_net, val_ds, info, p.roi_size, sw_batch_size=p.sw_batch_size,
                                    overlap=p.overlap, device=device, amp=amp, select=p.select, dist=dist)
    validate = ddp.synced(validate, net, dist)
    if average is not None:
        validate = average.wrap(validate)
    step = SupervisedStep(model, segmenter_loss(p.batch_dice), opt, segmenter_batches(info, device), device=device,
                          amp=amp)
    snapshot = Snapshot(ctx.stage_dir / ("train.resume.pt" if fold is None else f"fold{fold}.resume.pt"),
                        ctx.resume_key,
                        objects={k: v for k, v in {"net": net, "optimizer": opt, "scheduler": sched,
                                                   "scaler": step.scaler, "average": average}.items()
                                 if v is not None},
                        generators=[loader.generator], transforms=[train_ds.transform], every_seconds=p.snapshot_every,
                        dist=dist)
    run = fit(step, loader, epochs=p.epochs, modules=[net], optimizer=opt, scheduler=sched, snapshot=snapshot,
              validate=validate, epoch_start=epoch_start, dist=dist,
              val_every=p.val_every, val_columns=("val_dice", "val_loss"),
              on_best=save if dist.is_main else None, patience=p.patience,
              progress=advance, log=ctx.log, label=label, fixed=None if fold is None else {"fold": fold},
              window=p.select_window, min_epoch=p.first_keepable_epoch(p.epochs), average=average)
    ddp.check_identical({"network": net}, dist, ctx.log, label)
    if run.best is None or (dist.is_main and not ckpt.is_file()):
        raise StageError(f"{label}validation never gave a score (NaN); check the val split's labels")
    best = float(run.best.row["val_dice"])
    ctx.log.info("%strained %d epochs in %.0f s; kept epoch %d (val Dice %.4f) -> %s", label, run.epochs, run.seconds,
                 run.best_epoch, best, ckpt)
    return ({"best_val_dice": best, "best_epoch": run.best_epoch, "epochs": run.epochs,
             "stopped_early": run.stopped_early, "seconds": run.seconds}, run.history)


def _cross_validate(ctx: RunContext, ckpts: list[Path], held_out: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Out-of-fold predictions of every pooled case by its fold's model: masks, ``oof.csv``, ``crossval.json``."""
    from medpipe.data.volumes import write_nifti
    from medpipe.inference.evaluation import score_cases
    from medpipe.inference.segmentation import SegmentationModel
    from medpipe.metrics.segmentation import crossval_summary

    rows: list[dict[str, Any]] = []
    per_fold: list[list[Any]] = []
    out = ctx.stage_dir / "oof"
    n = sum(len(v) for v in held_out)
    classes: dict[int, str] = {}
    with ctx.progress("Out-of-fold predictions", n) as advance:
        for fold, (ckpt, items) in enumerate(zip(ckpts, held_out, strict=True)):
            model = SegmentationModel.load(ckpt, ctx.device, ctx.amp)
            classes = model.classes
            cases = []
            for res in score_cases(model, items):
                mask_path = out / f"{case_name(res.item)}.nii.gz"
                write_nifti(res.mask, res.grid.affine, mask_path)
                rows.append({"fold": fold, **res.row, "mask": str(mask_path.relative_to(ctx.stage_dir))})
                cases.append(res.scores)
                advance(1)
            per_fold.append(cases)
    summary = crossval_summary(per_fold, classes, seed=ctx.seed)
    write_csv_atomic(ctx.stage_dir / "oof.csv", rows, list(dict.fromkeys(k for r in rows for k in r)))
    write_text_atomic(ctx.stage_dir / "crossval.json", json.dumps(summary, indent=1) + "\n")
    ctx.log.info("cross-validation (%d folds, %d out-of-fold cases): Dice %s (95%% CI %s) pooled; per fold %s; "
                 "mean %s +- %s over folds", len(ckpts), n, summary["cv_dice"], format_ci(summary["cv_dice_ci95"]),
                 summary["cv_dice_folds"], summary["cv_dice_mean"], summary["cv_dice_sd"])
    return summary
