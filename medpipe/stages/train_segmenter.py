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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medpipe.data.datalist import load_datalist, split_items
from medpipe.data.labels import Target, label_info, n_classes
from medpipe.data.transform_defaults import segmenter_eval_transforms, segmenter_train_transforms
from medpipe.data.transforms import TransformList, set_random_state
from medpipe.errors import StageError
from medpipe.inference.checkpoint import write_segmenter_checkpoint
from medpipe.inference.package import SegmenterPackageOptions, build_segmenter_package
from medpipe.io import sha256_file, write_csv_atomic
from medpipe.models.segmentation import SegmenterName, SegmenterOptions
from medpipe.stage import InputPath, LabelValue, Need, OutputPath, RunContext, Size, StageParams, StageResult, stage


class TrainSegmenterParams(StageParams, SegmenterOptions):
    """The network options (``channels``, ``strides``, ``num_res_units``, ``norm``, ``dropout``) come from
    :class:`~medpipe.models.segmentation.SegmenterOptions`."""

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
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better val Dice")
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
        if self.train_transforms is None:
            self.train_transforms = segmenter_train_transforms(self.roi_size)
        if self.eval_transforms is None:
            self.eval_transforms = segmenter_eval_transforms()
        return self


@stage("train_segmenter", TrainSegmenterParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("checkpoint", "model"))
def train_segmenter(ctx: RunContext, p: TrainSegmenterParams) -> StageResult:
    import torch
    from monai.data import DataLoader

    from medpipe.data.datasets import make_dataset
    from medpipe.models.segmentation import build_from_config, segmenter_config
    from medpipe.report.training_plots import curve_png
    from medpipe.training.loop import SupervisedStep, Validation, fit, resolve_amp
    from medpipe.training.losses import segmenter_loss
    from medpipe.training.resume import Snapshot
    from medpipe.training.segmentation import segmenter_batches, segmenter_validation

    train_spec = p.train_transforms or segmenter_train_transforms(p.roi_size)  # both filled by the validator
    eval_spec = p.eval_transforms or segmenter_eval_transforms()
    t_start = time.perf_counter()
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    train_items = split_items(doc, "train", need_labels=True, path=dl_path)
    val_items = split_items(doc, "val", need_labels=True, path=dl_path)
    channels = list(doc.get("channels") or [])
    first = train_items[0]["image"]
    in_channels = len(channels) or (len(first) if isinstance(first, list) else 1)
    info = label_info(p.target, p.label_map, doc.get("label_names"))
    try:
        cfg = segmenter_config(p.model, in_channels, n_classes(info),
                               **p.model_dump(include=set(SegmenterOptions.model_fields)))
        net = build_from_config(cfg)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    device = ctx.device
    amp = resolve_amp(p.amp, ctx.amp, device)
    net.to(device)
    ctx.log.info("%s %s: %d inputs (%s), %d classes (%s), %.2fM parameters, on %s%s (%d CPU threads)", p.model,
                 cfg["channels"], in_channels, ", ".join(channels), n_classes(info), info["target"],
                 sum(t.numel() for t in net.parameters()) / 1e6, device, " with mixed precision" if amp else "",
                 torch.get_num_threads())

    cache_dir = Path(p.cache_dir).expanduser().resolve() if p.cache_dir else ctx.run_dir / "cache"
    t0 = time.perf_counter()
    try:
        train_ds = make_dataset(train_items, train_spec, p.cache, cache_dir)
        val_ds = make_dataset(val_items, eval_spec, p.cache, cache_dir)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot load the training data ({type(exc).__name__}: {exc}); check the transforms "
                         "and the datalist") from exc
    set_random_state(train_ds.transform, ctx.seed)
    ctx.log.info("data: %d train, %d val studies (cache %s, %.1f s)", len(train_items), len(val_items), p.cache,
                 time.perf_counter() - t0)
    loader = DataLoader(train_ds, batch_size=p.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(ctx.seed), pin_memory=device.startswith("cuda"))
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.lr * 0.02) \
        if p.lr_schedule == "cosine" else None
    ckpt = ctx.stage_dir / "checkpoint.pt"

    def save(epoch: int, v: Validation) -> None:
        write_segmenter_checkpoint(
            ckpt, net=net, model=cfg, labels=info, channels=channels, roi_size=list(p.roi_size),
            eval_transforms=eval_spec, sw_batch_size=p.sw_batch_size, overlap=p.overlap,
            record={"epoch": epoch, "val_dice": v.row["val_dice"], "datalist": str(dl_path), "seed": ctx.seed})

    step = SupervisedStep(net, segmenter_loss(p.batch_dice), opt, segmenter_batches(info, device), device=device,
                          amp=amp)
    snapshot = Snapshot(ctx.stage_dir / "train.resume.pt", ctx.resume_key,
                        objects={k: v for k, v in {"net": net, "optimizer": opt, "scheduler": sched,
                                                   "scaler": step.scaler}.items() if v is not None},
                        generators=[loader.generator], transforms=[train_ds.transform], every_seconds=p.snapshot_every)
    with ctx.progress(f"Training {p.model}", p.epochs) as advance:
        run = fit(step, loader, epochs=p.epochs, modules=[net], optimizer=opt, scheduler=sched, snapshot=snapshot,
                  validate=segmenter_validation(net, val_ds, info, p.roi_size, sw_batch_size=p.sw_batch_size,
                                                overlap=p.overlap, device=device, amp=amp),
                  val_every=p.val_every, val_columns=("val_dice",), on_best=save, patience=p.patience,
                  progress=advance, log=ctx.log)
    if run.best is None or not ckpt.is_file():
        raise StageError("validation never gave a Dice score (NaN); check the val split's labels")
    best = float(run.best.row["val_dice"])
    write_csv_atomic(ctx.stage_dir / "history.csv", run.history, ["epoch", "loss", "val_dice", "lr", "seconds"])
    curve_png(run.history, ctx.stage_dir / "curve.png",
              f"{p.model} {list(p.channels)}: best val Dice {best:.3f} (epoch {run.best_epoch})",
              metric="val_dice", metric_label="validation Dice", losses={"loss": "train loss (Dice + CE)"})
    ctx.log.info("trained %d epochs in %.0f s; best val Dice %.4f at epoch %d -> %s", run.epochs, run.seconds, best,
                 run.best_epoch, ckpt)
    codes = {k: v.model_dump() for k, v in (p.package.segment_codes or {}).items()}
    pkg = build_segmenter_package(
        ctx.stage_dir / "model", [ckpt], dl_path, name=p.package.name or f"{ctx.run_dir.name} {ctx.stage_dir.name}",
        tta=p.package.tta, segment_codes=codes,
        training={"seed": ctx.seed, "stage": ctx.stage_dir.name, "intended_use": p.package.intended_use})
    ctx.log.info("model package %s -> %s", pkg.version, pkg.path)
    return StageResult(
        outputs={"checkpoint": str(ckpt), "model": str(pkg.path)},
        metrics={"best_val_dice": round(best, 6), "best_epoch": run.best_epoch, "epochs_run": run.epochs,
                 "stopped_early": run.stopped_early, "train_seconds": round(run.seconds, 2),
                 "train_stage_seconds": round(time.perf_counter() - t_start, 2)},
        inputs={str(dl_path): sha256_file(dl_path)},
    )
