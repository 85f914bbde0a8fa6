"""Stage ``train_classifier``: a 2D / 3D CNN or a slice-sequence model on the datalist's classes.

Networks (:mod:`medpipe.models.classification`): MONAI ``densenet121``, ``resnet18/34/50``,
``efficientnet-b0`` (2D or 3D, chosen from the images unless ``spatial_dims`` is set), and
``cnn_rnn`` (2D CNN per slice + bidirectional GRU/LSTM + attention pooling) for study-level labels
of volumes. Binary and multi-class.

**Class imbalance** (``imbalance``):

* ``weighted_sampler``: each epoch draws ``len(train)`` items with replacement, item weight
  ``1 / count(class)`` (``torch.utils.data.WeightedRandomSampler``): classes are seen equally often.
* ``class_weights``: cross-entropy weighted ``n / (n_classes * count(class))`` per class.
* ``focal``: ``monai.losses.FocalLoss`` (``focal_gamma``), which down-weights easy examples.
* ``none``: plain cross-entropy.

**Selection.** The validation split is scored every ``val_every`` epochs: ROC AUC (macro one-vs-rest
when multi-class) with :func:`medpipe.metrics.classification.classification_metrics` and the
cross-entropy; the checkpoint with the best validation AUC is kept (ties: the lower loss), or with
``select: loss`` the one with the lowest validation loss (on a validation split of a dozen cases AUC
jumps between a few values and can pick an epoch whose probabilities are badly calibrated; the loss
also rewards calibration), or with ``select: last`` the final weights. The selection options of
:mod:`medpipe.training.selection` apply (``select_window``, ``min_epochs``, ``average: ema | swa``).
Training stops after ``patience`` epochs without a better checkpoint. A validation split (or fold)
of fewer than 5 cases is warned about.

**Decision threshold** (binary): ``threshold_rule: accuracy`` (or ``youden``) chooses the threshold on
the out-of-fold predictions (``folds: k``; without folds: on the validation split) of the kept models,
computed with the model package's TTA, by :func:`medpipe.metrics.classification.choose_threshold`;
``fixed`` keeps ``package.threshold``. The threshold is recorded in every checkpoint (``decision``) and
in the model package, so ``evaluate_classifier`` and ``medpipe score`` decide with it. The predictions
it was chosen on are written to ``oof.csv``.

**k-fold ensemble** (``folds: k``): the datalist's train and val patients are pooled and divided
into k stratified folds by patient (:func:`medpipe.data.splits.split_patients`); model i trains on
the other folds and is selected on fold i. The k checkpoints are the ensemble ``evaluate_classifier``
averages. The out-of-fold AUC (every pooled patient scored by the model that never saw it) is
reported as ``oof_auc``.

Synthetic items (from ``augment``) are used for training only; they never join a validation fold.
The loop is :func:`medpipe.training.loop.fit` with :mod:`medpipe.training.classification`'s validation;
this module only wires the data, network and outputs to it. Outputs ``{"classifier": [checkpoint paths]}``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from medpipe.data.datalist import class_counts, class_items, class_names, load_datalist, model_inputs, spatial_dims_of
from medpipe.data.transform_defaults import classifier_eval_transforms, classifier_train_transforms
from medpipe.data.transforms import TransformList, set_random_state
from medpipe.errors import StageError
from medpipe.inference.checkpoint import write_classifier_checkpoint
from medpipe.inference.package import ClassifierPackageOptions, build_classifier_package
from medpipe.io import write_csv_atomic
from medpipe.models.classification_config import ClassifierName, ClassifierOptions
from medpipe.stage import Axis, InputPath, Need, OutputPath, RunContext, Size, StageParams, StageResult, stage
from medpipe.training.losses import Imbalance
from medpipe.training.selection import FEW_VALIDATION_CASES, SelectionOptions


class TrainClassifierParams(StageParams, ClassifierOptions, SelectionOptions):
    """The network options (``stem``, ``widen_factor``, ``norm``, ``encoder``, ``rnn``, ...) come from
    :class:`~medpipe.models.classification.ClassifierOptions`, the selection options (``select_window``,
    ``min_epochs``, ``average``, ...) from :class:`~medpipe.training.selection.SelectionOptions`."""

    datalist: InputPath | None = Field(None, description="datalist.json; None: the previous dataset / import stage's")
    model: ClassifierName = "resnet18"
    spatial_dims: Literal[2, 3] | None = Field(None, description="None: from the first training image")
    spatial_size: tuple[Size, ...] | None = Field(None, description="default transforms resize images to this")
    imbalance: Imbalance = "none"
    focal_gamma: float = Field(2.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    val_every: int = Field(1, ge=1)
    select: Literal["auc", "loss", "last"] = Field("auc", description="keep the checkpoint with the best validation "
                                                                      "AUC (ties: lower loss), the lowest validation "
                                                                      "loss, or the last epoch's")
    threshold_rule: Literal["fixed", "accuracy", "youden"] = Field(
        "fixed", description="binary decision threshold: fixed (package.threshold), or chosen on the out-of-fold / "
                             "validation predictions for the best accuracy or Youden's J")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better checkpoint")
    folds: int | None = Field(None, ge=2, description="k-fold ensemble over the train + val patients")
    val_tta_axes: list[Axis] | None = Field(None, description="flip axes averaged when scoring validation")
    train_transforms: TransformList | None = Field(None, description="None: classifier_train_transforms")
    eval_transforms: TransformList | None = Field(None, description="None: classifier_eval_transforms")
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: OutputPath | None = Field(None, description="disk cache folder; None: <run dir>/cache")
    amp: bool | Literal["auto"] = Field("auto", description="mixed precision; auto: on CUDA")
    snapshot_every: float = Field(30.0, ge=0.0, le=86400.0,
                                  description="seconds between training snapshots, from which --resume continues an "
                                              "interrupted run (0: after every epoch)")
    package: ClassifierPackageOptions = Field(default_factory=ClassifierPackageOptions,
                                              description="the model package written to <stage>/model")

    @model_validator(mode="after")
    def _check(self) -> TrainClassifierParams:
        if self.model == "cnn_rnn" and self.spatial_dims == 2:
            raise ValueError("cnn_rnn reads volumes as slice sequences: spatial_dims must be 3")
        if self.spatial_size is not None and self.spatial_dims is not None and len(self.spatial_size) != self.spatial_dims:
            raise ValueError(f"spatial_size has {len(self.spatial_size)} values for {self.spatial_dims}D images")
        return self


@stage("train_classifier", TrainClassifierParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("classifier", "model", "datalist"), distributed=True)
def train_classifier(ctx: RunContext, p: TrainClassifierParams) -> StageResult:
    import numpy as np

    from medpipe.metrics.classification import classification_metrics
    from medpipe.report.training_plots import curve_png
    from medpipe.training.classification import decide, kfold_items, out_of_fold

    t_start = time.perf_counter()
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    train = class_items(doc, "train", path=dl_path)
    val = class_items(doc, "val", path=dl_path) if p.folds is None else [
        it for it in doc.get("val", []) if it.get("class") is not None]
    names = class_names(doc, [*train, *val])
    dims = p.spatial_dims or spatial_dims_of(train)
    if p.model == "cnn_rnn" and dims != 3:
        raise StageError("model cnn_rnn needs volumes (3D images); these are 2D")
    eval_spec = p.eval_transforms or classifier_eval_transforms(dims, p.spatial_size)
    train_spec = p.train_transforms or classifier_train_transforms(dims, p.spatial_size)
    folds = kfold_items(train, val, p.folds, ctx.seed)
    ckpts: list[str] = []
    history: list[dict[str, Any]] = []
    fold_metrics: list[dict[str, Any]] = []
    oof_true: list[int] = []
    oof_prob: list[Any] = []
    with ctx.progress(f"Training {p.model}" + (f" ({len(folds)} folds)" if len(folds) > 1 else ""),
                      p.epochs * len(folds)) as advance:
        for i, (fold_train, fold_val) in enumerate(folds):
            if not fold_val:
                raise StageError(f"fold {i} has no validation items; use fewer folds")
            path = ctx.stage_dir / (f"checkpoint_fold{i}.pt" if len(folds) > 1 else "checkpoint.pt")
            m, rows, prob = _train_fold(ctx, p, doc_path=dl_path, train=fold_train, val=fold_val, names=names,
                                        dims=dims, train_spec=train_spec, eval_spec=eval_spec, ckpt=path, fold=i,
                                        advance=advance)
            ckpts.append(str(path))
            history += rows
            fold_metrics.append(m)
            oof_true += [int(it["class"]) for it in fold_val]
            oof_prob.append(prob)
    if not ctx.dist.is_main:  # a rank of a distributed run: rank 0 writes everything that follows
        return StageResult()

    write_csv_atomic(ctx.stage_dir / "history.csv", history,
                     ["fold", "epoch", "loss", "val_loss", "val_auc", "lr", "seconds"])
    curve_png(history, ctx.stage_dir / "curve.png", f"{p.model}: training loss and validation AUC",
              metric="val_auc", metric_label="validation AUC", group="fold")

    metrics: dict[str, Any] = {
        "best_val_auc": round(float(np.mean([m["best_val_auc"] for m in fold_metrics])), 6),
        "best_epoch": [m["best_epoch"] for m in fold_metrics] if len(folds) > 1 else fold_metrics[0]["best_epoch"],
        "epochs_trained": sum(m["epochs"] for m in fold_metrics),
        "n_train": len(folds[0][0]), "n_val": len(folds[0][1]),
        "n_synthetic_train": sum(1 for it in folds[0][0] if it.get("synthetic")),
        "train_seconds": round(time.perf_counter() - t_start, 1),
    }
    if len(folds) > 1:
        oof = classification_metrics(np.asarray(oof_true), np.concatenate(oof_prob))
        metrics["oof_auc"] = None if math.isnan(oof["auc"]) else round(float(oof["auc"]), 6)
    po = p.package
    tta_axes = po.tta_axes if po.tta else None
    threshold = po.threshold
    if p.threshold_rule != "fixed":
        if len(names) != 2:
            raise StageError(f"threshold_rule {p.threshold_rule}: a decision threshold needs a binary problem; this "
                             f"one has {len(names)} classes")
        held = [fv for _, fv in folds]
        prob = out_of_fold([Path(c) for c in ckpts], held, device=ctx.device, amp=ctx.amp, tta_axes=tta_axes)
        decision = decide(ctx.stage_dir / "oof.csv", [Path(c) for c in ckpts], held, prob, names,
                          positive=po.positive_class, rule=p.threshold_rule)
        threshold = decision["threshold"]
        metrics.update({f"oof_{k}": v for k, v in decision.items() if k in ("threshold", "accuracy", "auc")})
        ctx.log.info("decision threshold %.4f on P(%s), chosen for the best %s on %d %s predictions (accuracy %.4f "
                     "there)", threshold, names[po.positive_class], p.threshold_rule, decision["n"],
                     "out-of-fold" if len(folds) > 1 else "validation", decision["accuracy"])
    pkg = build_classifier_package(
        ctx.stage_dir / "model", [Path(c) for c in ckpts], dl_path,
        name=po.name or f"{ctx.run_dir.name} {ctx.stage_dir.name}", tta_axes=tta_axes,
        positive_class=po.positive_class, threshold=threshold,
        class_codes={k: v.model_dump() for k, v in (po.class_codes or {}).items()},
        validation={k: metrics[k] for k in ("best_val_auc", "oof_auc", "oof_threshold", "oof_accuracy")
                    if k in metrics},
        training={"seed": ctx.seed, "stage": ctx.stage_dir.name, "intended_use": po.intended_use,
                  "threshold_rule": p.threshold_rule})
    ctx.log.info("model package %s -> %s", pkg.version, pkg.path)
    return StageResult(outputs={"classifier": ckpts, "model": str(pkg.path), "datalist": str(dl_path)},
                       metrics=metrics, inputs={})


def _train_fold(ctx: RunContext, p: TrainClassifierParams, *, doc_path: Path, train: list[dict[str, Any]],
                val: list[dict[str, Any]], names: dict[int, str], dims: int, train_spec: list[dict[str, Any]],
                eval_spec: list[dict[str, Any]], ckpt: Path, fold: int, advance: Any
                ) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Train one model; return (metrics, history rows, the kept checkpoint's validation probabilities)."""
    import numpy as np
    import torch
    from monai.data import DataLoader

    from medpipe.data.datasets import make_dataset
    from medpipe.inference.classification import valid_tta_axes
    from medpipe.models.classification import build_classifier, check_input_size
    from medpipe.models.classification_config import classifier_config
    from medpipe.training import ddp
    from medpipe.training.classification import CLASSIFIER_FLOOR, classifier_batches, classifier_validation
    from medpipe.training.imbalance import make_sampler, sample_weights
    from medpipe.training.loop import SupervisedStep, Validation, fit, resolve_amp
    from medpipe.training.losses import make_loss
    from medpipe.training.resume import Snapshot

    n_cls = len(names)
    if len(val) < FEW_VALIDATION_CASES:
        ctx.log.warning("fold %d: the checkpoint is chosen on %d validation case(s); with fewer than %d the choice "
                        "is noise (use fewer or no folds with a larger val split, select_window, average: ema / swa, "
                        "select: last, min_epochs)", fold, len(val), FEW_VALIDATION_CASES)
    counts = class_counts(train, n_cls)
    if (counts == 0).any():
        missing = [names[c] for c in range(n_cls) if counts[c] == 0]
        ctx.log.warning("fold %d: no training item of class %s", fold, ", ".join(missing))
    cache_dir = Path(p.cache_dir).expanduser().resolve() if p.cache_dir else ctx.run_dir / "cache"
    dist, seed = ctx.dist, ctx.seed + fold
    held = ddp.cached_items(train, p.cache, dist, seed)  # this rank's training items
    try:
        train_ds = make_dataset(model_inputs(held), train_spec, p.cache, cache_dir)
        val_ds = make_dataset(model_inputs(ddp.shard(val, dist)), eval_spec, p.cache, cache_dir)
        first = (val_ds if len(val_ds) else make_dataset(model_inputs(val[:1]), eval_spec))[0]["image"]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot load the images ({type(exc).__name__}: {exc}); check the transforms "
                         "and the datalist") from exc
    set_random_state(train_ds.transform, dist.rank_seed(seed))
    input_shape = [int(s) for s in first.shape]
    if len(input_shape) != dims + 1:
        raise StageError(f"the eval transforms give images of shape {input_shape}; a {dims}D classifier needs "
                         f"(channels, {', '.join(['size'] * dims)})")
    try:
        cfg = classifier_config(p.model, dims, input_shape[0], n_cls,
                                **p.model_dump(include=set(ClassifierOptions.model_fields)))
        torch.manual_seed(ctx.seed + fold)
        net = build_classifier(cfg)
        check_input_size(net, input_shape)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    device = ctx.device
    amp = resolve_amp(p.amp, ctx.amp, device)
    net.to(device)
    model = ddp.wrap(net, dist)  # what trains; ``net`` holds its weights
    n_synthetic = sum(1 for it in train if it.get("synthetic"))
    ctx.log.info("fold %d: %s (%dD, input %s, %d classes, %.2fM parameters) on %s; %d train (%s per class, %d "
                 "synthetic), %d val; imbalance %s", fold, p.model, dims, input_shape, n_cls,
                 sum(t.numel() for t in net.parameters()) / 1e6, device, len(train), counts.tolist(), n_synthetic,
                 len(val), p.imbalance)

    epoch_start = None
    if dist.enabled:
        weights = sample_weights([int(it["class"]) for it in held], counts).tolist() \
            if p.imbalance == "weighted_sampler" else None
        per_rank = -(-len(train) // dist.world_size)
        loader, epoch_start, sampler = ddp.train_loader(train_ds, batch_size=p.batch_size, seed=seed, dist=dist,
                                                        partitioned=p.cache == "memory", weights=weights,
                                                        drop_last=per_rank > p.batch_size,
                                                        pin_memory=device.startswith("cuda"))
    else:
        sampler = make_sampler(p.imbalance, [int(it["class"]) for it in train], counts, seed)
        loader = DataLoader(train_ds, batch_size=p.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=0, generator=torch.Generator().manual_seed(seed),
                            drop_last=len(train) > p.batch_size, pin_memory=device.startswith("cuda"))
    loss_fn = make_loss(p.imbalance, counts, gamma=p.focal_gamma, label_smoothing=p.label_smoothing)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.lr * 0.01) \
        if p.lr_schedule == "cosine" else None

    def bn_batches() -> Any:  # the training images without augmentation (batch norm of averaged weights)
        for start in range(0, len(bn_ds), p.batch_size):
            yield torch.stack([bn_ds[i]["image"] for i in range(start, min(start + p.batch_size, len(bn_ds)))])

    bn_ds = make_dataset(model_inputs(ddp.shard(train, dist)), eval_spec, p.cache, cache_dir) \
        if p.average != "none" else None
    average = p.weight_average(net, p.epochs, bn_batches, dist)
    kept_net = average.module if average is not None else net  # what is validated and kept

    def save(epoch: int, v: Validation) -> None:
        write_classifier_checkpoint(ckpt, net=kept_net, model=cfg, names=names, input_shape=input_shape,
                                    eval_transforms=eval_spec, record={
                                        "epoch": epoch, "val_auc": v.values["auc"], "val_loss": v.values["val_loss"],
                                        "fold": fold, "datalist": str(doc_path), "seed": ctx.seed,
                                        "imbalance": p.imbalance, "n_train": len(train), "n_synthetic": n_synthetic,
                                        "average": p.average,
                                        "inference": {"tta_axes": p.package.tta_axes if p.package.tta else None}})

    validate = classifier_validation(kept_net, val_ds, [int(it["class"]) for it in val], select=p.select, device=device,
                                     amp=amp, tta_axes=valid_tta_axes(p.val_tta_axes, dims),
                                     batch_size=max(p.batch_size, 32), dist=dist)
    validate = ddp.synced(validate, net, dist)
    if average is not None:
        validate = average.wrap(validate)
    step = SupervisedStep(model, loss_fn, opt, classifier_batches(device), device=device, amp=amp)
    snapshot = Snapshot(ctx.stage_dir / f"fold{fold}.resume.pt", ctx.resume_key,
                        objects={k: v for k, v in {"net": net, "optimizer": opt, "scheduler": sched,
                                                   "scaler": step.scaler, "average": average}.items() if v is not None},
                        generators=[loader.generator, getattr(sampler, "generator", None)],
                        transforms=[train_ds.transform], every_seconds=p.snapshot_every, dist=dist)
    run = fit(step, loader, snapshot=snapshot, epoch_start=epoch_start, dist=dist,
              epochs=p.epochs, modules=[net], optimizer=opt, scheduler=sched, validate=validate,
              val_every=p.val_every, val_columns=("val_loss", "val_auc"), floor=CLASSIFIER_FLOOR[p.select],
              on_best=save if dist.is_main else None, patience=p.patience, fixed={"fold": fold}, progress=advance, log=ctx.log,
              label=f"fold {fold} ", window=p.select_window, min_epoch=p.first_keepable_epoch(p.epochs),
              average=average)
    ddp.check_identical({"network": net}, dist, ctx.log, f"fold {fold}: ")
    kept = run.best.values if run.best is not None else {"score": -1.0, "prob": np.zeros((len(val), n_cls))}
    return {"best_val_auc": kept["score"], "best_epoch": run.best_epoch, "epochs": run.epochs}, run.history, kept["prob"]
