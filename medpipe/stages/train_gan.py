"""Stage ``train_gan``: a class-conditional DCGAN (:mod:`medpipe.models.gan`) on the train split's images.

Learns the images of the datalist's ``train`` split only (never ``val`` / ``test``; items marked
``synthetic`` are refused: a GAN must not learn from a GAN). Images are loaded with
:func:`medpipe.training.gan.load_images` (the classifier's default eval transforms, 2D: intensities to
``[0, 1]`` per image; resized to ``image_size`` when given) and mapped to ``[-1, 1]``. The GAN and its
feature extractor train in :func:`medpipe.training.loop.fit` (:class:`medpipe.training.gan.GanStep`);
the FID is :mod:`medpipe.metrics.generative`, the pictures :mod:`medpipe.report.training_plots`.

**Conditioning.** ``condition_on: target`` (default) trains the GAN on the target class's train
images alone (its single "class" is ``target_class``); ``all`` conditions it on every class of the
train split (projection discriminator), so that what the classes share (speckle, tissue layers, the
field of view) is learnt from all images. On BreastMNIST (147 malignant of 546 train images, 28 px,
one CPU thread, the same ~95 s of GAN training) ``target`` was clearly better: FID 2.3-3.3 (160
epochs; 3 runs, 2 seeds) against 7.3 and 16.1 for ``all`` (40 epochs, the same number of steps);
59-81 % of its images were classified as malignant against 59-64 % (real val images: 76-81 %).
In a fixed budget the conditional GAN spends three quarters of
its steps on the benign class and has to learn to separate the classes first; the one-class GAN
spends every step on the class ``augment`` needs. ``all`` remains for larger budgets.

**Quality score.** A GAN's losses do not say whether its images are good, so the stage trains a
small feature extractor here, from scratch on the real train images (a MONAI ResNet-18 with a small
stem, :mod:`medpipe.models.classification`; nothing is downloaded), and computes the Fréchet
distance (``monai.metrics.FIDMetric``) between its penultimate features of

* the real train images of ``target_class`` and ``n_eval`` generated ones: ``gan_fid``;
* the real train and the real *val* images of ``target_class``: ``gan_fid_real_reference``, the
  distance between two real samples (what a perfect generator would score, up to sample size);
* the real train images and random subsets of the generated ones as large as that val sample,
  averaged: ``gan_fid_matched`` (FID is biased upwards for small samples, so this is the number to
  compare with the reference);

plus ``gan_target_class_rate``, the fraction of generated target-class images the extractor calls
``target_class`` (and ``gan_target_class_rate_real_val``, the same on real val images, for scale).
With ``fid_every`` the FID of the generator's moving average is also tracked during training
(``history.csv``; epoch 0 = the untrained generator: the trivial baseline).

With the defaults on BreastMNIST (seed 0, one CPU thread, 113 s in all): ``gan_fid`` 2.42 against 44.6
for the untrained generator and 7.3 after 20 epochs; ``gan_fid_matched`` 4.49 against a real-vs-real
reference of 2.61 (the generated images are further from the real ones than a second real sample
is); 73 % of the generated images classified as malignant (real val: 76 %).

Writes ``generator.pt`` (atomic, ``torch.load(weights_only=True)``-readable: the moving-average
generator's weights, its configuration, the classes, image size, target class, seed and the metrics),
``samples.png`` (per class: real train images above generated ones), ``history.csv`` and
``curve.png``. Outputs ``{"generator": path}`` for the ``augment`` stage.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import Field

from medpipe.data.datalist import class_items, class_names, load_datalist, spatial_dims_of
from medpipe.errors import StageError
from medpipe.inference.checkpoint import write_gan_checkpoint
from medpipe.io import sha256_file, write_csv_atomic
from medpipe.models.gan_config import GanOptions
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage


class TrainGanParams(StageParams, GanOptions):
    """Defaults tuned on BreastMNIST (546 train images of 28 px): about 2 minutes on one CPU thread. The network
    options (``latent_dim``, ``g_channels``, ``d_channels``, ``g_upsample``, ``d_norm``, ``minibatch_std``) come
    from :class:`~medpipe.models.gan.GanOptions`."""

    datalist: InputPath | None = Field(default=None, description="datalist.json; None: the artifact 'datalist' of an "
                                                            "earlier stage")
    target_class: int | None = Field(default=None, ge=0, description="the class that augment will generate; None: "
                                                                      "the train split's smallest class")
    condition_on: Literal["target", "all"] = Field(
        default="target", description="target: learn the target class's images alone; all: a GAN conditional on "
                                      "every class of the train split (learns what the classes share from all images)")
    image_size: int | None = Field(default=None, ge=4, description="side the images are resized to (divisible by "
                                                                   "4); None: the first train image's size")
    epochs: int = Field(default=120, ge=1, description="passes over the GAN's train images (condition_on: target: "
                                                       "those of the target class)")
    batch_size: int = Field(default=32, ge=2, description="images per step (the last partial batch is dropped)")
    lr_g: float = Field(default=1e-4, gt=0, description="generator learning rate (Adam)")
    lr_d: float = Field(default=4e-4, gt=0, description="discriminator learning rate (Adam; 4x lr_g: the two "
                                                        "time-scale rule)")
    beta1: float = Field(default=0.0, ge=0, lt=1, description="Adam beta1 of both networks (0 as in SNGAN)")
    loss: Literal["hinge", "bce"] = Field(default="hinge", description="hinge, or bce: non-saturating cross-entropy "
                                                                       "with one-sided label smoothing (0.9)")
    diffaugment: bool = Field(default=True, description="augment real and generated images before the discriminator "
                                                        "(translation, left-right flip, brightness/contrast): keeps "
                                                        "it from memorising a small train split")
    flip_axis: int | None = Field(default=0, ge=0, le=1, description="spatial axis DiffAugment may flip (0: "
                                                                     "left-right for PNGs); None: no flips")
    ema_decay: float = Field(default=0.995, ge=0, lt=1, description="moving average of the generator's weights "
                                                                    "(the saved generator); 0: the last iterate")
    n_eval: int = Field(default=500, ge=2, description="generated target-class images the FID and class rate use")
    fid_every: int = Field(default=20, ge=0, description="track the FID every this many epochs (0: at the end only)")
    extractor_epochs: int = Field(default=15, ge=1, description="epochs of the feature extractor (ResNet-18, small "
                                                                "stem, trained here from scratch)")
    extractor_width: float = Field(default=0.25, gt=0, description="its widen factor (0.25: 128 features)")
    grid: int = Field(default=10, ge=1, le=32, description="images per row of samples.png")
    snapshot_every: float = Field(30.0, ge=0.0, le=86400.0,
                                  description="seconds between training snapshots, from which --resume continues an "
                                              "interrupted run (0: after every epoch)")


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


# -- the stage --------------------------------------------------------------------------------------------


@stage("train_gan", TrainGanParams, needs=(Need("datalist", params=("datalist",)),),
       gives=("generator", "datalist"), distributed=True)
def train_gan(ctx: RunContext, p: TrainGanParams) -> StageResult:
    import copy

    import torch

    from medpipe.metrics.generative import class_rate, features_and_classes, fid, matched_fid
    from medpipe.models.gan import (
        build_discriminator,
        build_generator,
        d_bce_loss,
        d_hinge_loss,
        diff_augment,
        g_bce_loss,
        g_hinge_loss,
        recalibrate_batchnorm,
    )
    from medpipe.models.gan_config import gan_config
    from medpipe.report.training_plots import curve_png, samples_png
    from medpipe.training import ddp
    from medpipe.training.gan import GAN_COLUMNS, GanStep, gan_summary, load_images, train_feature_extractor
    from medpipe.training.loop import ShuffledBatches, Validation, fit
    from medpipe.training.resume import Snapshot

    t_start = time.perf_counter()
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    train_items = class_items(doc, "train", path=dl_path)
    synthetic = [it for it in train_items if it.get("synthetic")]
    if synthetic:
        raise StageError(f"{dl_path}: {len(synthetic)} synthetic item(s) in the train split (e.g. "
                         f"{synthetic[0].get('image')}); train the GAN on the datalist before augment")
    if spatial_dims_of(train_items) != 2:
        raise StageError("train_gan makes 2D images; the train split holds 3D volumes")
    names = class_names(doc, train_items)
    present = sorted({int(it["class"]) for it in train_items})
    counts = {c: sum(int(it["class"]) == c for it in train_items) for c in present}
    target = p.target_class if p.target_class is not None else min(present, key=lambda c: (counts[c], c))
    if target not in counts:
        raise StageError(f"target_class: the train split has no image of class {target} (it has "
                         f"{', '.join(f'{c} ({names[c]})' for c in present)})")
    val_items = [it for it in doc.get("val", []) if it.get("class") is not None]
    if any(it.get("synthetic") for it in val_items):
        class_items(doc, "val", path=dl_path)  # raises: synthetic data in the val split

    x, y = load_images(train_items, p.image_size)
    size = [int(s) for s in x.shape[2:]]
    if any(s % 4 for s in size):
        raise StageError(f"the train images are {size[0]}x{size[1]} pixels; the GAN needs sides divisible by 4: set "
                         f"image_size (e.g. {4 * round(size[0] / 4) or 4})")
    xv, yv = load_images(val_items, p.image_size) if val_items else (x[:0], y[:0])
    if xv.shape[2:] != x.shape[2:]:
        raise StageError(f"val images are {list(xv.shape[2:])} pixels, train images {size}; set image_size")
    device, dist = ctx.device, ctx.dist
    ctx.log.info("GAN on %d train images %s (%d channel(s)); target class %d (%s, %d images); conditioned on %s; "
                 "%d CPU thread(s)", len(x), size, x.shape[1], target, names[target], counts[target], p.condition_on,
                 torch.get_num_threads())

    # feature extractor first, so the FID can be tracked while the GAN trains
    t0 = time.perf_counter()
    extractor = train_feature_extractor(x, y, max(names) + 1, epochs=p.extractor_epochs, width=p.extractor_width,
                                        seed=ctx.seed, device=device, flip_axis=p.flip_axis)
    real_feats, _ = features_and_classes(extractor, x[y == target], device)
    extractor_val_acc = val_target_rate = None
    val_feats = real_feats[:0]
    if len(xv):
        vf, vp = features_and_classes(extractor, xv, device)
        extractor_val_acc = float((vp == yv).float().mean())
        val_feats = vf[yv == target]
        val_target_rate = class_rate(vp[yv == target], target)
    reference = fid(real_feats, val_feats)
    ctx.log.info("feature extractor: %d epochs in %.0f s, val accuracy %s; real train vs real val FID (class %d): %s",
                 p.extractor_epochs, time.perf_counter() - t0,
                 "n/a" if extractor_val_acc is None else f"{extractor_val_acc:.3f}", target,
                 "n/a" if reference is None else f"{reference:.2f}")

    # the GAN
    classes = present if p.condition_on == "all" else [target]
    index_of = {c: i for i, c in enumerate(classes)}
    keep = torch.as_tensor([int(c) in index_of for c in y.tolist()])
    gx = x[keep]
    gy = torch.as_tensor([index_of[int(c)] for c in y[keep].tolist()], dtype=torch.long)
    if len(gx) < 2:
        raise StageError(f"only {len(gx)} train image(s) to learn from; the GAN needs more")
    try:
        cfg = gan_config(size, int(x.shape[1]), len(classes), **p.model_dump(include=set(GanOptions.model_fields)))
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    g_net = build_generator(cfg, seed=ctx.seed).to(device)
    d_net = build_discriminator(cfg, seed=ctx.seed + 1).to(device)
    ema = copy.deepcopy(g_net).eval()
    opt_g = torch.optim.Adam(g_net.parameters(), lr=p.lr_g, betas=(p.beta1, 0.999))
    opt_d = torch.optim.Adam(d_net.parameters(), lr=p.lr_d, betas=(p.beta1, 0.999))
    gen = torch.Generator().manual_seed(ctx.seed + 2)  # shuffling (the same on every rank), latents, augmentation
    latents = torch.Generator().manual_seed(dist.rank_seed(ctx.seed + 2)) if dist.enabled else gen  # a rank's own
    target_idx = torch.full((p.n_eval,), index_of[target], dtype=torch.long)

    def sample_ema() -> Any:  # the averaged weights get their own batch-norm statistics, the same way every time
        recalibrate_batchnorm(ema, gy, torch.Generator().manual_seed(ctx.seed + 5))
        return ema.sample(target_idx, torch.Generator().manual_seed(ctx.seed + 3)).cpu()

    def validate(epoch: int) -> Validation:
        value = _round(fid(real_feats, features_and_classes(extractor, sample_ema(), device)[0]))
        return Validation({"fid": value}, None, f"FID {value}")

    step = GanStep(ddp.wrap(g_net, dist), ddp.wrap(d_net, dist), ema, opt_g, opt_d, latent_dim=p.latent_dim,
                   generator=latents, d_loss=d_hinge_loss if p.loss == "hinge" else d_bce_loss,
                   g_loss=g_hinge_loss if p.loss == "hinge" else g_bce_loss,
                   augment=(lambda t: diff_augment(t, latents, flip_axis=p.flip_axis)) if p.diffaugment
                   else (lambda t: t), ema_decay=p.ema_decay, device=device)
    snapshot = Snapshot(ctx.stage_dir / "gan.resume.pt", ctx.resume_key,
                        objects={"generator": g_net, "discriminator": d_net, "ema": ema, "opt_g": opt_g,
                                 "opt_d": opt_d, "step": step}, generators=[gen, latents] if dist.enabled else [gen],
                        every_seconds=p.snapshot_every, dist=dist)
    batches = ShuffledBatches([gx, gy], min(p.batch_size, len(gx)), gen, drop_last=True, rank=dist.rank,
                              world=dist.world_size)
    with ctx.progress("Training GAN", p.epochs) as advance:
        run = fit(step, batches, snapshot=snapshot, dist=dist,
                  epochs=p.epochs, modules=[g_net], validate=ddp.on_main(validate, dist) if p.fid_every else None,
                  val_every=p.fid_every or 1, validate_first=True, val_columns=("fid",), summarize=gan_summary,
                  summary_columns=GAN_COLUMNS, finite=("d_loss", "g_loss"), progress=advance, log=ctx.log)
    for net in (g_net, d_net, ema):  # batch-norm statistics: each rank's own batches (G, D), rank 0's (the EMA's)
        dist.sync_buffers(net)
    ddp.check_identical({"generator": g_net, "discriminator": d_net, "moving-average generator": ema}, dist, ctx.log)
    if not dist.is_main:  # a rank of a distributed run: rank 0 writes everything that follows
        return StageResult()

    # the score of the final (moving-average) generator
    fake_feats, fake_pred = features_and_classes(extractor, sample_ema(), device)
    gan_fid = fid(real_feats, fake_feats)
    matched = matched_fid(real_feats, fake_feats, len(val_feats), ctx.seed)
    target_rate = float(class_rate(fake_pred, target) or 0.0)  # n_eval >= 2 images: never None
    ctx.log.info("GAN: %d epochs in %.0f s; FID %s (matched to the val sample: %s; real-vs-real reference %s); "
                 "%.1f%% of generated images classified as %s", p.epochs, run.seconds, _round(gan_fid),
                 _round(matched), _round(reference), 100 * target_rate, names[target])

    # pictures and tables
    grid_rows: list[tuple[str, Any]] = []
    pick = torch.Generator().manual_seed(ctx.seed + 4)
    for c in classes:
        real_c = x[y == c]
        real_c = real_c[torch.randperm(len(real_c), generator=pick)[:p.grid]]
        fake_c = ema.sample(torch.full((p.grid,), index_of[c], dtype=torch.long), pick).cpu()
        grid_rows += [(f"real {c}\n{names[c]}", real_c.numpy()), (f"generated {c}\n{names[c]}", fake_c.numpy())]
    samples_png(ctx.stage_dir / "samples.png", grid_rows,
                f"train_gan: {p.epochs} epochs, FID (class {target}) {_round(gan_fid)}, "
                f"real-vs-real {_round(reference)}")
    write_csv_atomic(ctx.stage_dir / "history.csv", run.history, ["epoch", *GAN_COLUMNS, "fid", "seconds"])
    curve_png(run.history, ctx.stage_dir / "curve.png",
              f"{'conditional ' if len(classes) > 1 else ''}DCGAN on {len(gx)} train images: FID (class {target}) "
              f"{_round(gan_fid)}, real-vs-real {_round(reference)}",
              metric="fid", metric_label="FID of the target class (EMA generator)", metric_range=None,
              losses={"d_loss": f"D loss ({p.loss})", "g_loss": "G loss"})

    metrics = {"gan_fid": _round(gan_fid), "gan_fid_matched": _round(matched),
               "gan_fid_real_reference": _round(reference), "gan_target_class_rate": round(target_rate, 4),
               "gan_target_class_rate_real_val": _round(val_target_rate),
               "gan_extractor_val_accuracy": _round(extractor_val_acc), "gan_target_class": target,
               "gan_train_seconds": round(run.seconds, 2),
               "gan_seconds": round(time.perf_counter() - t_start, 2)}
    out = ctx.stage_dir / "generator.pt"
    write_gan_checkpoint(out, generator=ema, model=cfg, classes=list(classes), names=names, image_size=size,
                         in_channels=int(x.shape[1]), target_class=target,
                         record={"seed": ctx.seed, "epochs": p.epochs, "datalist": str(dl_path), "metrics": metrics})
    metrics["gan_seconds"] = round(time.perf_counter() - t_start, 2)
    return StageResult(outputs={"generator": str(out), "datalist": str(dl_path)}, metrics=metrics, inputs={str(dl_path): sha256_file(dl_path)})
