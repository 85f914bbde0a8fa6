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
also rewards calibration). Training stops after ``patience`` epochs without a better checkpoint.

**k-fold ensemble** (``folds: k``): the datalist's train and val patients are pooled and divided
into k stratified folds by patient (:func:`medpipe.data.splits.split_patients`); model i trains on
the other folds and is selected on fold i. The k checkpoints are the ensemble ``evaluate_classifier``
averages. The out-of-fold AUC (every pooled patient scored by the model that never saw it) is
reported as ``oof_auc``.

Synthetic items (from ``augment``) are used for training only; they never join a validation fold.
Outputs ``{"classifier": [checkpoint paths]}``.
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
from medpipe.inference.classification import predict_proba, valid_tta_axes
from medpipe.io import atomic_path, write_csv_atomic
from medpipe.stage import Need, RunContext, StageParams, StageResult, stage
from medpipe.training.imbalance import inverse_frequency_weights, sample_weights

Imbalance = Literal["none", "weighted_sampler", "class_weights", "focal"]


class TrainClassifierParams(StageParams):
    datalist: str | None = Field(None, description="datalist.json; None: the previous dataset / import stage's")
    model: Literal["densenet121", "resnet18", "resnet34", "resnet50", "efficientnet-b0", "cnn_rnn"] = "resnet18"
    spatial_dims: Literal[2, 3] | None = Field(None, description="None: from the first training image")
    spatial_size: tuple[int, ...] | None = Field(None, description="default transforms resize images to this")
    stem: Literal["standard", "small"] = Field("standard", description="resnet / cnn_rnn: small = 3x3 conv, no "
                                                                       "max pool (for images of about 32 px)")
    stem_stride: int = Field(1, ge=1, le=4, description="stride of the small stem's convolution")
    widen_factor: float = Field(1.0, gt=0, description="resnet / cnn_rnn encoder width multiplier")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: Literal["batch", "instance", "group"] = Field("batch", description="normalisation layers; instance or "
                                                        "group for 3D networks trained with a few volumes per batch")
    encoder: Literal["resnet10", "resnet18", "resnet34"] = Field("resnet18", description="cnn_rnn slice encoder")
    rnn: Literal["gru", "lstm"] = "gru"
    rnn_hidden: int = Field(64, ge=1)
    rnn_layers: int = Field(1, ge=1)
    imbalance: Imbalance = "none"
    focal_gamma: float = Field(2.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    val_every: int = Field(1, ge=1)
    select: Literal["auc", "loss"] = Field("auc", description="keep the checkpoint with the best validation AUC "
                                                              "(ties: lower loss) or the lowest validation loss")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better checkpoint")
    folds: int | None = Field(None, ge=2, description="k-fold ensemble over the train + val patients")
    val_tta_axes: list[int] | None = Field(None, description="flip axes averaged when scoring validation")
    train_transforms: TransformList | None = Field(None, description="None: classifier_train_transforms")
    eval_transforms: TransformList | None = Field(None, description="None: classifier_eval_transforms")
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: str | None = Field(None, description="disk cache folder; None: <run dir>/cache")
    amp: bool | Literal["auto"] = Field("auto", description="mixed precision; auto: on CUDA")

    @model_validator(mode="after")
    def _check(self) -> TrainClassifierParams:
        if self.model == "cnn_rnn" and self.spatial_dims == 2:
            raise ValueError("cnn_rnn reads volumes as slice sequences: spatial_dims must be 3")
        if self.spatial_size is not None and self.spatial_dims is not None and len(self.spatial_size) != self.spatial_dims:
            raise ValueError(f"spatial_size has {len(self.spatial_size)} values for {self.spatial_dims}D images")
        return self


# -- pieces (small functions, tested on their own) ---------------------------------------------------


def make_loss(kind: Imbalance, counts: Any, *, gamma: float = 2.0, label_smoothing: float = 0.0) -> Any:
    """The loss for ``imbalance`` (logits ``(B, C)``, integer targets ``(B,)``)."""
    import torch
    from torch import nn

    if kind == "focal":
        from monai.losses import FocalLoss

        focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma)

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return focal(logits, target.view(-1, 1))

        return loss
    weight = torch.as_tensor(inverse_frequency_weights(counts), dtype=torch.float32) if kind == "class_weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def make_sampler(kind: Imbalance, classes: list[int], counts: Any, seed: int) -> Any:
    """A ``WeightedRandomSampler`` for ``weighted_sampler``, else None (plain shuffling)."""
    import torch

    if kind != "weighted_sampler":
        return None
    weights = sample_weights(classes, counts).tolist()
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(classes), replacement=True,
                                                  generator=torch.Generator().manual_seed(seed))


def _curve_png(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for fold in sorted({h["fold"] for h in history}):
        rows = [h for h in history if h["fold"] == fold]
        tag = f" (fold {fold})" if len(history) != len(rows) else ""
        ax.plot([h["epoch"] for h in rows], [h["loss"] for h in rows], color="tab:blue", alpha=0.7,
                label=f"train loss{tag}" if fold == 0 or not tag else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    for fold in sorted({h["fold"] for h in history}):
        val = [(h["epoch"], h["val_auc"]) for h in history if h["fold"] == fold and h["val_auc"] is not None]
        if val:
            ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", ms=2, alpha=0.8)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("validation AUC", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _folds(train: list[dict[str, Any]], val: list[dict[str, Any]], k: int | None, seed: int
           ) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """``[(train items, val items)]``: the datalist's split, or k patient folds of train + val."""
    if k is None:
        return [(train, val)]
    from medpipe.data.splits import split_patients

    real = [it for it in [*train, *val] if not it.get("synthetic")]
    synthetic = [it for it in train if it.get("synthetic")]
    strata: dict[str, int] = {}
    for it in real:
        pid = str(it.get("patient_id") or it["image"])
        strata[pid] = max(strata.get(pid, 0), int(it["class"]))
    out = []
    for i in range(k):
        parts = split_patients(strata, val=0.0, test=0.0, seed=seed, folds=k, fold=i)
        held = set(parts["val"])
        fold_val = [it for it in real if str(it.get("patient_id") or it["image"]) in held]
        out.append(([it for it in real if str(it.get("patient_id") or it["image"]) not in held] + synthetic, fold_val))
    return out


# -- the stage ----------------------------------------------------------------------------------------


@stage("train_classifier", TrainClassifierParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("classifier",))
def train_classifier(ctx: RunContext, p: TrainClassifierParams) -> StageResult:
    import numpy as np

    from medpipe.metrics.classification import classification_metrics

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
    folds = _folds(train, val, p.folds, ctx.seed)
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
            m, rows, prob = _train_one(ctx, p, doc_path=dl_path, train=fold_train, val=fold_val, names=names,
                                       dims=dims, train_spec=train_spec, eval_spec=eval_spec, ckpt=path, fold=i,
                                       advance=advance)
            ckpts.append(str(path))
            history += rows
            fold_metrics.append(m)
            oof_true += [int(it["class"]) for it in fold_val]
            oof_prob.append(prob)

    write_csv_atomic(ctx.stage_dir / "history.csv", history,
                     ["fold", "epoch", "loss", "val_loss", "val_auc", "lr", "seconds"])
    _curve_png(history, ctx.stage_dir / "curve.png", f"{p.model}: training loss and validation AUC")

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
    return StageResult(outputs={"classifier": ckpts}, metrics=metrics, inputs={})


def _train_one(ctx: RunContext, p: TrainClassifierParams, *, doc_path: Path, train: list[dict[str, Any]],
               val: list[dict[str, Any]], names: dict[int, str], dims: int, train_spec: list[dict[str, Any]],
               eval_spec: list[dict[str, Any]], ckpt: Path, fold: int, advance: Any
               ) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Train one model; return (metrics, history rows, the kept checkpoint's validation probabilities)."""
    import numpy as np
    import torch
    from monai.data import DataLoader

    from medpipe.data.datasets import make_dataset
    from medpipe.inference.device import autocast
    from medpipe.metrics.classification import classification_metrics
    from medpipe.models.classification import build_classifier, check_input_size, classifier_config

    n_cls = len(names)
    counts = class_counts(train, n_cls)
    if (counts == 0).any():
        missing = [names[c] for c in range(n_cls) if counts[c] == 0]
        ctx.log.warning("fold %d: no training item of class %s", fold, ", ".join(missing))
    cache_dir = Path(p.cache_dir).expanduser().resolve() if p.cache_dir else ctx.run_dir / "cache"
    try:
        train_ds = make_dataset(model_inputs(train), train_spec, p.cache, cache_dir)
        val_ds = make_dataset(model_inputs(val), eval_spec, p.cache, cache_dir)
        first = val_ds[0]["image"]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot load the images ({type(exc).__name__}: {exc}); check the transforms "
                         "and the datalist") from exc
    set_random_state(train_ds.transform, ctx.seed + fold)
    input_shape = [int(s) for s in first.shape]
    if len(input_shape) != dims + 1:
        raise StageError(f"the eval transforms give images of shape {input_shape}; a {dims}D classifier needs "
                         f"(channels, {', '.join(['size'] * dims)})")
    try:
        cfg = classifier_config(p.model, dims, input_shape[0], n_cls, stem=p.stem, stem_stride=p.stem_stride,
                                widen_factor=p.widen_factor, dropout=p.dropout, norm=p.norm, encoder=p.encoder, rnn=p.rnn,
                                rnn_hidden=p.rnn_hidden, rnn_layers=p.rnn_layers)
        torch.manual_seed(ctx.seed + fold)
        net = build_classifier(cfg)
        check_input_size(net, input_shape)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    device = ctx.device
    amp = ctx.amp if p.amp == "auto" else bool(p.amp) and device.startswith("cuda")
    net.to(device)
    tta = valid_tta_axes(p.val_tta_axes, dims)
    ctx.log.info("fold %d: %s (%dD, input %s, %d classes, %.2fM parameters) on %s; %d train (%s per class, %d "
                 "synthetic), %d val; imbalance %s", fold, p.model, dims, input_shape, n_cls,
                 sum(t.numel() for t in net.parameters()) / 1e6, device, len(train), counts.tolist(),
                 sum(1 for it in train if it.get("synthetic")), len(val), p.imbalance)

    classes = [int(it["class"]) for it in train]
    sampler = make_sampler(p.imbalance, classes, counts, ctx.seed + fold)
    loader = DataLoader(train_ds, batch_size=p.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=0,
                        generator=torch.Generator().manual_seed(ctx.seed + fold), drop_last=len(train) > p.batch_size,
                        pin_memory=device.startswith("cuda"))
    loss_fn = make_loss(p.imbalance, counts, gamma=p.focal_gamma, label_smoothing=p.label_smoothing)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.lr * 0.01) \
        if p.lr_schedule == "cosine" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    y_val = np.asarray([int(it["class"]) for it in val])

    rows: list[dict[str, Any]] = []
    best_auc, best_loss, best_epoch, epoch = -1.0, math.inf, 0, 0
    best_prob = np.zeros((len(val), len(names)))
    t0 = time.perf_counter()
    for epoch in range(1, p.epochs + 1):
        net.train()
        losses = []
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            y = torch.as_tensor(batch["class"]).long().to(device).view(-1)
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                loss = loss_fn(net(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
        if sched is not None:
            sched.step()
        row: dict[str, Any] = {"fold": fold, "epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
                               "val_loss": None, "val_auc": None, "lr": opt.param_groups[0]["lr"],
                               "seconds": round(time.perf_counter() - t0, 2)}
        if epoch % p.val_every == 0 or epoch == p.epochs:
            net.eval()
            prob = predict_proba([net], val_ds, device=device, amp=amp, tta_axes=tta, batch_size=max(p.batch_size, 32))
            auc = classification_metrics(y_val, prob)["auc"]
            vloss = float(-np.mean(np.log(np.clip(prob[np.arange(len(y_val)), y_val], 1e-7, 1.0))))
            row.update(val_loss=round(vloss, 6), val_auc=None if math.isnan(auc) else round(float(auc), 6))
            score = -1.0 if math.isnan(auc) else float(auc)
            better = vloss < best_loss if p.select == "loss" else \
                score > best_auc or (score == best_auc and vloss < best_loss)
            if better:
                best_auc, best_loss, best_epoch, best_prob = score, vloss, epoch, prob
                write_classifier_checkpoint(ckpt, net=net, model=cfg, names=names, input_shape=input_shape,
                                 eval_transforms=eval_spec, record={
                                     "epoch": epoch, "val_auc": auc, "val_loss": vloss, "fold": fold,
                                     "datalist": str(doc_path), "seed": ctx.seed, "imbalance": p.imbalance,
                                     "n_train": len(train), "n_synthetic": sum(1 for it in train if it.get("synthetic")),
                                 })
            ctx.log.info("fold %d epoch %d/%d: loss %.4f, val loss %.4f, val AUC %.4f (kept: epoch %d)", fold, epoch,
                         p.epochs, row["loss"], vloss, auc, best_epoch)
        rows.append(row)
        advance(1)
        if p.patience is not None and best_epoch and epoch - best_epoch >= p.patience:
            ctx.log.info("fold %d: early stop at epoch %d (no better checkpoint for %d epochs)", fold, epoch, p.patience)
            advance(p.epochs - epoch)
            break
    return ({"best_val_auc": best_auc, "best_epoch": best_epoch, "epochs": epoch}, rows, best_prob)
