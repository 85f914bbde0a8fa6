"""Stage ``train_detector``: a 3D RetinaNet (MONAI ``monai.apps.detection``) trained on lung-nodule boxes.

The datalist's items carry ``findings`` (centre in LPS mm + diameter, from the DICOM SR's SCOORD3D
points); each becomes a box in world space and, through MONAI's box transforms, a box in the voxels
of the preprocessed image, whatever the acquisition's orientation (:mod:`medpipe.data.detection`).
Training cuts ``num_samples`` patches of ``patch_size`` per scan with ``RandCropBoxByPosNegLabeld``
(``pos`` : ``neg`` patches holding a whole nodule : anywhere), flips and rotates image and boxes
together, and trains the detector (:mod:`medpipe.models.detection`: ResNet + FPN, anchors of
``anchor_shapes``, ATSS matching, hard negative sampling) with AdamW through the one training loop
(:func:`medpipe.training.loop.fit`, resume snapshots included). Every ``val_every`` epochs the val
scans go through sliding-window inference with box NMS, and the detections are scored by FROC as
LUNA16 does; the checkpoint with the best validation CPM is kept (``checkpoint.pt``).

Outputs: ``checkpoint.pt`` (weights, network configuration, preprocessing and inference settings:
:class:`medpipe.inference.detection.DetectionModel` needs nothing else), ``history.csv``,
``curve.png`` and the model package (``model/``) that ``medpipe score`` takes; the package's
``report_threshold`` (which findings ``score`` reports) is the score threshold of 1 false positive
per validation scan at the kept epoch, unless set. Gives ``detector``,
``model`` and the ``datalist`` it used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from medpipe.data.datalist import load_datalist
from medpipe.data.detection import finding_items
from medpipe.errors import StageError
from medpipe.io import sha256_file, write_csv_atomic
from medpipe.models.detection_config import DetectorOptions
from medpipe.stage import InputPath, Need, RunContext, Size, StageParams, StageResult, stage
from medpipe.training.selection import FEW_VALIDATION_CASES

Millimetre = Annotated[float, Field(gt=0.0, le=100.0)]
Hounsfield = Annotated[float, Field(ge=-3000.0, le=30000.0)]


class TrainDetectorParams(StageParams, DetectorOptions):
    """The network options (``widths``, ``blocks``, ``fpn_channels``, ``returned_layers``, ``conv1_stride``,
    ``anchor_shapes``) come from :class:`~medpipe.models.detection_config.DetectorOptions`."""

    datalist: InputPath | None = Field(None, description="datalist.json with findings; None: the dataset stage's")
    pixdim: tuple[Millimetre, Millimetre, Millimetre] = Field((4.0, 4.0, 4.0), description="voxel size the detector sees (mm)")
    hu_window: tuple[Hounsfield, Hounsfield] = Field((-1000.0, 500.0), description="HU mapped to [0, 1] (clipped)")
    patch_size: tuple[Size, Size, Size] = Field((32, 32, 32), description="training patch (voxels)")
    num_samples: int = Field(4, ge=1, le=64, description="patches per scan per step")
    pos: float = Field(4.0, ge=0.0, description="weight of patches holding a whole nodule")
    neg: float = Field(1.0, ge=0.0, description="weight of patches anywhere")
    batch_size: int = Field(1, ge=1, description="scans per step (each gives num_samples patches)")
    epochs: int = Field(80, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    val_every: int = Field(20, ge=1)
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better checkpoint")
    roi_size: tuple[Size, Size, Size] = Field((96, 96, 96), description="sliding-window size (voxels)")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    score_thresh: float = Field(0.02, ge=0.0, lt=1.0, description="detections below this score are dropped")
    nms_thresh: float = Field(0.1, gt=0.0, le=1.0, description="box IoU above which the lower-scored is dropped")
    detections_per_image: int = Field(50, ge=1, le=10000, description="most detections kept per scan")
    report_threshold: float | None = Field(None, ge=0.0, le=1.0,
                                           description="findings `medpipe score` reports: score at or above this; None: "
                                                       "the threshold of 1 false positive per validation scan")
    snapshot_every: float = Field(30.0, ge=0.0, le=86400.0, description="seconds between training snapshots "
                                                                         "(--resume continues from them)")
    name: str | None = Field(None, description="the model package's name")

    @model_validator(mode="after")
    def _check(self) -> TrainDetectorParams:
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window: the low end ({self.hu_window[0]}) must be below the high end "
                             f"({self.hu_window[1]})")
        return self


@stage("train_detector", TrainDetectorParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("detector", "model", "datalist"))
def train_detector(ctx: RunContext, p: TrainDetectorParams) -> StageResult:
    import numpy as np
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.data.utils import no_collation

    from medpipe.data.detection import detection_item, detector_transforms
    from medpipe.data.transforms import set_random_state
    from medpipe.inference.detection import DetectionModel, write_detector_checkpoint
    from medpipe.models.detection import build_detector, set_training
    from medpipe.models.detection_config import DetectorConfig
    from medpipe.report.training_plots import curve_png
    from medpipe.training.detection import DetectorStep, detector_validation
    from medpipe.training.loop import Validation, fit
    from medpipe.training.resume import Snapshot

    t_start = time.perf_counter()
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    train = finding_items(doc, "train", path=dl_path)
    val = finding_items(doc, "val", path=dl_path)
    if len(val) < FEW_VALIDATION_CASES:
        ctx.log.warning("the checkpoint is chosen on %d validation scan(s): with fewer than %d the choice is noise",
                        len(val), FEW_VALIDATION_CASES)
    n_train_nodules = sum(len(it["findings"]) for it in train)
    if n_train_nodules == 0:
        raise StageError(f"the train split of {dl_path} has no nodule; a detector needs positive examples")
    try:
        cfg = DetectorConfig.from_dict({**p.model_dump(include=set(DetectorOptions.model_fields)), "in_channels": 1,
                                        "num_classes": 1})
        detector = build_detector(cfg)
        train_items = [detection_item(it) for it in train]
        val_items = [detection_item(it) for it in val]
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    set_training(detector)
    detector.to(ctx.device)
    ctx.log.info("RetinaNet (ResNet widths %s, FPN %d, anchors %s voxels at %s mm): %.2fM parameters, on %s "
                 "(%d CPU threads)", list(p.widths), p.fpn_channels, [list(a) for a in p.anchor_shapes],
                 list(p.pixdim), sum(t.numel() for t in detector.network.parameters()) / 1e6, ctx.device,
                 torch.get_num_threads())
    preprocessing = {"pixdim": list(p.pixdim), "hu_window": list(p.hu_window)}
    inference = {"roi_size": list(p.roi_size), "overlap": p.overlap, "score_thresh": p.score_thresh,
                 "nms_thresh": p.nms_thresh, "detections_per_image": p.detections_per_image}

    t0 = time.perf_counter()
    try:
        train_ds = CacheDataset(train_items, detector_transforms(
            pixdim=p.pixdim, hu_window=p.hu_window, train=True, patch_size=p.patch_size, num_samples=p.num_samples,
            pos=p.pos, neg=p.neg), progress=False)
        eval_t = detector_transforms(pixdim=p.pixdim, hu_window=p.hu_window, train=False, with_boxes=False)
        val_images = [eval_t({"image": it["image"]})["image"] for it in val_items]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot load the detection data ({type(exc).__name__}: {exc}); check the datalist") from exc
    set_random_state(train_ds.transform, ctx.seed)
    ctx.log.info("data: %d train scans (%d nodules), %d val scans (%d nodules) at %s mm (%.1f s)", len(train),
                 n_train_nodules, len(val), sum(len(it["findings"]) for it in val), list(p.pixdim),
                 time.perf_counter() - t0)
    loader = DataLoader(train_ds, batch_size=p.batch_size, shuffle=True, num_workers=0, collate_fn=no_collation,
                        generator=torch.Generator().manual_seed(ctx.seed))
    opt = torch.optim.AdamW(detector.network.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.lr * 0.02)
    model = DetectionModel(detector, preprocessing, inference, ctx.device)
    ckpt = ctx.stage_dir / "checkpoint.pt"

    def save(epoch: int, v: Validation) -> None:
        at_1fp = float(v.values["threshold_at_1fp"])
        report = p.report_threshold if p.report_threshold is not None else min(at_1fp, 1.0)
        write_detector_checkpoint(ckpt, net=detector.network, model=cfg.to_dict(), preprocessing=preprocessing,
                                  inference={**inference, "report_threshold": round(report, 6)},
                                  record={"epoch": epoch, "val_cpm": v.row["val_cpm"], "datalist": str(dl_path),
                                          "seed": ctx.seed})

    validate = detector_validation(model, val_images, [it["findings"] for it in val])
    snapshot = Snapshot(ctx.stage_dir / "train.resume.pt", ctx.resume_key,
                        objects={"net": detector.network, "optimizer": opt, "scheduler": sched},
                        generators=[loader.generator], transforms=[train_ds.transform],
                        every_seconds=p.snapshot_every)
    with ctx.progress("Training detector", p.epochs) as advance:
        run = fit(DetectorStep(detector, opt, device=ctx.device), loader, epochs=p.epochs, modules=[detector],
                  optimizer=opt, scheduler=sched, snapshot=snapshot, validate=validate, val_every=p.val_every,
                  val_columns=("val_cpm", "val_sens_1fp"), on_best=save, patience=p.patience,
                  finite=("loss",), progress=advance, log=ctx.log)
    if run.best is None or not ckpt.is_file():
        raise StageError("validation never gave a score; check the val split's findings")
    columns = ["epoch", "loss", "cls_loss", "box_loss", "val_cpm", "val_sens_1fp", "lr", "seconds"]
    write_csv_atomic(ctx.stage_dir / "history.csv", run.history, columns)
    best = float(run.best.row["val_cpm"])
    curve_png(run.history, ctx.stage_dir / "curve.png",
              f"RetinaNet: best val CPM {best:.3f} (epoch {run.best_epoch})", metric="val_cpm",
              metric_label="validation CPM", losses={"loss": "train loss (cls + box)"})
    ctx.log.info("trained %d epochs in %.0f s; kept epoch %d (val CPM %.4f) -> %s", run.epochs, run.seconds,
                 run.best_epoch, best, ckpt)
    pkg_path = _package(ctx, p, ckpt, dl_path)
    return StageResult(
        outputs={"detector": str(ckpt), "model": str(pkg_path), "datalist": str(dl_path)},
        metrics={"best_val_cpm": round(best, 6) if np.isfinite(best) else None, "best_epoch": run.best_epoch,
                 "epochs_run": run.epochs, "stopped_early": run.stopped_early,
                 "train_seconds": round(run.seconds, 2),
                 "train_stage_seconds": round(time.perf_counter() - t_start, 2)},
        inputs={str(dl_path): sha256_file(dl_path)},
    )


def _package(ctx: RunContext, p: TrainDetectorParams, ckpt: Path, dl_path: Path) -> Path:
    from medpipe.inference.package import build_detector_package

    pkg = build_detector_package(ctx.stage_dir / "model", ckpt, dl_path,
                                 name=p.name or f"{ctx.run_dir.name} {ctx.stage_dir.name}",
                                 training={"seed": ctx.seed, "stage": ctx.stage_dir.name})
    ctx.log.info("model package %s -> %s", pkg.version, pkg.path)
    return pkg.path
