"""Stage ``train_segmenter``: a 3D MONAI UNet / SegResNet trained on the datalist's train split.

Dice + cross-entropy loss (``monai.losses.DiceCELoss``) on patches that the train transforms cut
(positive / negative sampling with ``RandCropByPosNegLabeld``: its ``num_samples``, ``pos`` and
``neg`` are set in the transform list), sliding-window validation (``monai.inferers``) with
``monai.metrics.DiceMetric`` on the val split every ``val_every`` epochs, the best checkpoint kept
(written atomically), early stopping after ``patience`` epochs without a better validation Dice, a
progress bar, one log line per epoch, ``history.csv`` and a loss / validation-Dice curve
(``curve.png``). On CUDA it trains in mixed precision (``amp: auto``).

The checkpoint (``checkpoint.pt``, readable with ``torch.load(weights_only=True)``) holds the
weights, the network configuration (:func:`medpipe.models.segmentation.segmenter_config`), the
classes and label mapping, the channel names, ``roi_size`` and the eval transforms, so ``evaluate``
and ``predict`` need nothing else.

Validation Dice is the mean over val cases of the mean foreground-class Dice, over the cases whose
ground truth has that class (tumour-free cases are not averaged in, as in ``evaluate``); when no val
case has any foreground, an empty prediction on an empty truth counts as 1.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from medpipe.data.datalist import load_datalist, split_items
from medpipe.data.labels import Target, label_info, map_labels, n_classes
from medpipe.data.transform_defaults import segmenter_eval_transforms, segmenter_train_transforms
from medpipe.data.transforms import TransformList, set_random_state
from medpipe.errors import StageError
from medpipe.inference.checkpoint import SEGMENTER_FORMAT, SEGMENTER_VERSION, save_checkpoint
from medpipe.io import atomic_path, sha256_file, write_csv_atomic
from medpipe.stage import Need, RunContext, StageParams, StageResult, stage


class TrainSegmenterParams(StageParams):
    datalist: str | None = Field(None, description="datalist.json; None: the dataset stage's output")
    model: Literal["unet", "segresnet"] = "unet"
    channels: tuple[int, ...] = Field((16, 32, 64, 128), min_length=2, description="features per level")
    strides: tuple[int, ...] | None = Field(None, description="UNet downsampling per level; None: 2 everywhere")
    num_res_units: int = Field(0, ge=0)
    norm: Literal["instance", "batch", "group"] = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    roi_size: tuple[int, int, int] = Field((64, 64, 32), description="sliding-window size (voxels)")
    batch_size: int = Field(2, ge=1, description="items per step (each gives num_samples patches)")
    epochs: int = Field(100, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    batch_dice: bool = Field(False, description="Dice loss over the whole batch, not per patch (steadier when "
                                                "patches without foreground are sampled)")
    target: Target = Field("whole_tumor", description="whole_tumor: label > 0; multiclass: one class per label")
    label_map: dict[int, int] | None = Field(None, description="multiclass: label value -> class (others: 0)")
    train_transforms: TransformList | None = Field(None, description="None: segmenter_train_transforms(roi_size)")
    eval_transforms: TransformList | None = Field(None, description="None: segmenter_eval_transforms()")
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: str | None = Field(None, description="disk cache folder; None: <run dir>/cache")
    val_every: int = Field(5, ge=1)
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better val Dice")
    amp: bool | Literal["auto"] = Field("auto", description="mixed precision; auto: on CUDA")
    sw_batch_size: int = Field(4, ge=1)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fill(self) -> TrainSegmenterParams:
        if self.label_map is not None and self.target != "multiclass":
            raise ValueError("label_map is used with target: multiclass only")
        if self.train_transforms is None:
            self.train_transforms = segmenter_train_transforms(self.roi_size)
        if self.eval_transforms is None:
            self.eval_transforms = segmenter_eval_transforms()
        return self


def _dice_scores(prob: Any, truth: Any, classes: int) -> list[float]:
    """Per foreground class Dice of argmax(prob) vs truth (both on one grid); NaN where the truth lacks it."""
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    pred = one_hot(prob.argmax(1, keepdim=True), classes)
    gt = one_hot(truth.long(), classes)
    d = compute_dice(pred, gt, include_background=False, ignore_empty=True)
    return [float(v) for v in torch.as_tensor(d).reshape(-1)]


def _validate(net: Any, val_ds: Any, info: dict[str, Any], p: TrainSegmenterParams, device: str, amp: bool) -> float:
    import numpy as np

    from medpipe.inference.segmentation import infer_probabilities

    classes = n_classes(info)
    scores: list[float] = []
    empty_ok: list[float] = []
    for i in range(len(val_ds)):
        d = val_ds[i]
        image = d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else d["image"]
        prob = infer_probabilities(net, image[None].float(), p.roi_size, sw_batch_size=p.sw_batch_size,
                                   overlap=p.overlap, device=device, amp=amp)
        truth = map_labels(d["label"][None].as_tensor() if hasattr(d["label"], "as_tensor") else d["label"][None],
                           info)
        per_class = _dice_scores(prob, truth, classes)
        case = [v for v in per_class if not math.isnan(v)]
        if case:
            scores.append(float(np.mean(case)))
        else:
            empty_ok.append(1.0 if int((prob.argmax(1) > 0).sum()) == 0 else 0.0)
    if scores:
        return float(np.mean(scores))
    return float(np.mean(empty_ok)) if empty_ok else float("nan")


def _curve_png(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="train loss (Dice + CE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    val = [(h["epoch"], h["val_dice"]) for h in history if h["val_dice"] is not None]
    if val:
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", ms=3, label="val Dice")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("validation Dice", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@stage("train_segmenter", TrainSegmenterParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("checkpoint",))
def train_segmenter(ctx: RunContext, p: TrainSegmenterParams) -> StageResult:
    import numpy as np
    import torch
    from monai.data import DataLoader
    from monai.losses import DiceCELoss

    from medpipe.data.datasets import make_dataset
    from medpipe.inference.device import autocast
    from medpipe.models.segmentation import build_segmenter, segmenter_config

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
        cfg = segmenter_config(p.model, in_channels, n_classes(info), channels=p.channels, strides=p.strides,
                               num_res_units=p.num_res_units, norm=p.norm, dropout=p.dropout)
        net = build_segmenter(**cfg)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    device = ctx.device
    amp = ctx.amp if p.amp == "auto" else bool(p.amp) and device.startswith("cuda")
    net.to(device)
    n_params = sum(t.numel() for t in net.parameters())
    ctx.log.info("%s %s: %d inputs (%s), %d classes (%s), %.2fM parameters, on %s%s (%d CPU threads)", p.model,
                 cfg["channels"], in_channels, ", ".join(channels), n_classes(info), info["target"], n_params / 1e6,
                 device, " with mixed precision" if amp else "", torch.get_num_threads())

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
    generator = torch.Generator().manual_seed(ctx.seed)
    loader = DataLoader(train_ds, batch_size=p.batch_size, shuffle=True, num_workers=0, generator=generator,
                        pin_memory=device.startswith("cuda"))

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=p.batch_dice)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.lr * 0.02) \
        if p.lr_schedule == "cosine" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    ckpt = ctx.stage_dir / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    best, best_epoch, epoch = -1.0, 0, 0
    stopped_early = False
    t_train = time.perf_counter()
    with ctx.progress(f"Training {p.model}", p.epochs) as advance:
        for epoch in range(1, p.epochs + 1):
            net.train()
            losses: list[float] = []
            for batch in loader:
                x = batch["image"].to(device, non_blocking=True)
                y = map_labels(batch["label"].to(device, non_blocking=True), info)
                opt.zero_grad(set_to_none=True)
                with autocast(device, amp):
                    loss = loss_fn(net(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
            if sched is not None:
                sched.step()
            if not losses:
                raise StageError("the train transforms produced no batch; check the datalist's train split")
            row: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": None,
                                   "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t_train, 2)}
            if epoch % p.val_every == 0 or epoch == p.epochs:
                vd = _validate(net, val_ds, info, p, device, amp)
                row["val_dice"] = vd
                if not math.isnan(vd) and vd > best:
                    best, best_epoch = vd, epoch
                    save_checkpoint(ckpt, {
                        "format": SEGMENTER_FORMAT, "version": SEGMENTER_VERSION,
                        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                        "model": cfg, "labels": info, "channels": channels, "roi_size": list(p.roi_size),
                        "eval_transforms": eval_spec, "sw_batch_size": p.sw_batch_size, "overlap": p.overlap,
                        "epoch": epoch, "val_dice": vd, "datalist": str(dl_path), "seed": ctx.seed,
                    })
                ctx.log.info("epoch %d/%d: loss %.4f, val Dice %.4f (best %.4f at epoch %d)", epoch, p.epochs,
                             row["loss"], vd, best, best_epoch)
            else:
                ctx.log.info("epoch %d/%d: loss %.4f", epoch, p.epochs, row["loss"])
            history.append(row)
            advance(1)
            if p.patience is not None and best_epoch and epoch - best_epoch >= p.patience:
                stopped_early = True
                ctx.log.info("early stop at epoch %d: no better val Dice for %d epochs", epoch, p.patience)
                break
    train_seconds = time.perf_counter() - t_train
    if not ckpt.is_file():
        raise StageError("validation never gave a Dice score (NaN); check the val split's labels")

    write_csv_atomic(ctx.stage_dir / "history.csv", history, ["epoch", "loss", "val_dice", "lr", "seconds"])
    _curve_png(history, ctx.stage_dir / "curve.png",
               f"{p.model} {list(p.channels)}: best val Dice {best:.3f} (epoch {best_epoch})")
    ctx.log.info("trained %d epochs in %.0f s; best val Dice %.4f at epoch %d -> %s", epoch, train_seconds, best,
                 best_epoch, ckpt)
    return StageResult(
        outputs={"checkpoint": str(ckpt)},
        metrics={"best_val_dice": round(best, 6), "best_epoch": best_epoch, "epochs_run": epoch,
                 "stopped_early": stopped_early, "train_seconds": round(train_seconds, 2),
                 "train_stage_seconds": round(time.perf_counter() - t_start, 2)},
        inputs={str(dl_path): sha256_file(dl_path)},
    )
