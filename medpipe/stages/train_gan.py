"""Stage ``train_gan``: a class-conditional DCGAN (:mod:`medpipe.models.gan`) on the train split's images.

Learns the images of the datalist's ``train`` split only (never ``val`` / ``test``; items marked
``synthetic`` are refused: a GAN must not learn from a GAN). Images are loaded with the classifier
stages' :func:`~medpipe.stages._classification.default_eval_transforms` (2D: intensities to
``[0, 1]`` per image; resized to ``image_size`` when given) and mapped to ``[-1, 1]``.

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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from medpipe.data.datalist import class_items, class_names, load_datalist, spatial_dims_of
from medpipe.data.transform_defaults import classifier_eval_transforms
from medpipe.errors import StageError
from medpipe.inference.checkpoint import save_checkpoint
from medpipe.io import atomic_path, sha256_file, write_csv_atomic
from medpipe.stage import Need, RunContext, StageParams, StageResult, stage


class TrainGanParams(StageParams):
    """Defaults tuned on BreastMNIST (546 train images of 28 px): about 2 minutes on one CPU thread."""

    datalist: str | None = Field(default=None, description="datalist.json; None: the artifact 'datalist' of an "
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
    latent_dim: int = Field(default=64, ge=1, description="size of the generator's noise vector")
    g_channels: int = Field(default=16, ge=1, description="width of the generator's last layer (the others: 2x, 4x)")
    d_channels: int = Field(default=32, ge=1, description="width of the discriminator's first layer (others: 2x, 4x)")
    g_upsample: Literal["resize", "transposed"] = Field(
        default="resize", description="generator upsampling: resize (nearest 2x + 3x3 convolution: smoother, no "
                                      "checkerboard) or transposed convolutions (faster)")
    loss: Literal["hinge", "bce"] = Field(default="hinge", description="hinge, or bce: non-saturating cross-entropy "
                                                                       "with one-sided label smoothing (0.9)")
    d_norm: Literal["spectral", "batch"] = Field(default="spectral", description="the discriminator's normalisation")
    minibatch_std: bool = Field(default=True, description="the discriminator sees each batch's spread (against "
                                                          "mode collapse)")
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


# -- data ------------------------------------------------------------------------------------------------


def load_images(items: list[dict[str, Any]], size: int | None) -> tuple[Any, Any]:
    """``(images (N, C, H, W) in [-1, 1], classes (N,))`` of 2D items through the default eval transforms."""
    import torch

    from medpipe.data.datasets import make_dataset

    spec = classifier_eval_transforms(2, (size, size) if size else None)
    try:
        ds = make_dataset(items, spec, "none")
        images = [ds[i]["image"] for i in range(len(ds))]
        x = torch.stack([torch.as_tensor(im.as_tensor() if hasattr(im, "as_tensor") else im).float()
                         for im in images])
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"cannot load the images ({type(exc).__name__}: {exc}); check the datalist's image "
                         "files (all one size, or set image_size)") from exc
    y = torch.as_tensor([int(it["class"]) for it in items], dtype=torch.long)
    return x * 2.0 - 1.0, y


# -- feature extractor and FID ---------------------------------------------------------------------------


def train_extractor(x: Any, y: Any, n_classes: int, p: TrainGanParams, seed: int, device: str) -> Any:
    """A small ResNet classifier trained from scratch on ``(x, y)`` (class-weighted CE, DiffAugment as augmentation)."""
    import torch

    from medpipe.data.datalist import class_counts
    from medpipe.models.classification import build_classifier, classifier_config
    from medpipe.models.gan import diff_augment
    from medpipe.training.imbalance import inverse_frequency_weights

    cfg = classifier_config("resnet18", 2, int(x.shape[1]), max(n_classes, 2), stem="small",
                            widen_factor=p.extractor_width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_classifier(cfg).to(device)
    counts = class_counts([{"class": int(c)} for c in y.tolist()], max(n_classes, 2))
    weight = torch.as_tensor(inverse_frequency_weights(counts), dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = p.extractor_epochs * math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    net.train()
    for _ in range(p.extractor_epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = diff_augment(x[idx], gen, flip_axis=p.flip_axis, translation=0.1).to(device)
            loss = torch.nn.functional.cross_entropy(net(xb), y[idx].to(device), weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def features_and_classes(net: Any, x: Any, device: str, batch: int = 256) -> tuple[Any, Any]:
    """The extractor's penultimate features (input of its last linear layer, float64) and predicted classes."""
    import torch

    captured: list[Any] = []
    handle = net.fc.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    preds = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                preds.append(net(x[i:i + batch].to(device)).argmax(1).cpu())
    finally:
        handle.remove()
    return torch.cat(captured).double().cpu(), torch.cat(preds)


def fid(a: Any, b: Any) -> float | None:
    """Fréchet distance between two feature sets (``monai.metrics.FIDMetric``); None with fewer than 2 in either."""
    if len(a) < 2 or len(b) < 2:
        return None
    import contextlib
    import io as _io
    import warnings

    from monai.metrics import FIDMetric

    # MONAI prints when it regularises a singular product; SciPy warns about near-singular covariances
    # (fewer samples than features) and about MONAI's use of a deprecated argument
    with contextlib.redirect_stdout(_io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(FIDMetric()(a, b))


def matched_fid(real: Any, fake: Any, n: int, seed: int, repeats: int = 10) -> float | None:
    """Mean FID of ``real`` vs ``repeats`` random subsets of ``fake`` of size ``n`` (the sample size of a reference)."""
    import torch

    if n < 2 or len(fake) < n:
        return None
    gen = torch.Generator().manual_seed(seed)
    values = [fid(real, fake[torch.randperm(len(fake), generator=gen)[:n]]) for _ in range(repeats)]
    return float(np.mean([v for v in values if v is not None]))


# -- pictures ---------------------------------------------------------------------------------------------


def _display(image: np.ndarray) -> np.ndarray:
    """``(C, W, H)`` in the loader's array convention (MONAI's PIL reader transposes) -> ``(H, W[, C])`` in [0, 1]."""
    a = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
    return a[0].T if a.shape[0] == 1 else a.transpose(2, 1, 0)


def samples_png(path: Path, rows: list[tuple[str, np.ndarray]], title: str) -> None:
    """One labelled row per ``(label, images (N, C, W, H) in [-1, 1])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.0 * ncol + 1.6, 1.05 * len(rows) + 0.5), dpi=100,
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for k in range(ncol):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < len(imgs):
                ax.imshow(_display(imgs[k]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def curve_png(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    rows = [h for h in history if h["epoch"] > 0]
    ep = [h["epoch"] for h in rows]
    ax.plot(ep, [h["d_loss"] for h in rows], color="tab:blue", label="D loss (hinge)")
    ax.plot(ep, [h["g_loss"] for h in rows], color="tab:green", label="G loss (-D(fake))")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left", fontsize=8)
    tracked = [(h["epoch"], h["fid"]) for h in history if h.get("fid") is not None]
    if tracked:
        ax2 = ax.twinx()
        ax2.plot(*zip(*tracked, strict=True), "o-", color="tab:orange", ms=3)
        ax2.set_ylabel("FID of the target class (EMA generator)", color="tab:orange")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


# -- the stage --------------------------------------------------------------------------------------------


@stage("train_gan", TrainGanParams, needs=(Need("datalist", params=("datalist",)),), gives=("generator",))
def train_gan(ctx: RunContext, p: TrainGanParams) -> StageResult:
    import copy

    import torch

    from medpipe.models.gan import (
        GAN_FORMAT,
        GAN_VERSION,
        build_discriminator,
        build_generator,
        d_bce_loss,
        d_hinge_loss,
        diff_augment,
        g_bce_loss,
        g_hinge_loss,
        gan_config,
        recalibrate_batchnorm,
        update_ema,
    )

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
    val_target = [it for it in val_items if int(it["class"]) == target]
    xv, yv = load_images(val_items, p.image_size) if val_items else (x[:0], y[:0])
    if xv.shape[2:] != x.shape[2:]:
        raise StageError(f"val images are {list(xv.shape[2:])} pixels, train images {size}; set image_size")
    device = ctx.device
    n_classes = max(names) + 1
    ctx.log.info("GAN on %d train images %s (%d channel(s)); target class %d (%s, %d images); conditioned on %s; "
                 "%d CPU thread(s)", len(x), size, x.shape[1], target, names[target], counts[target], p.condition_on,
                 torch.get_num_threads())

    # feature extractor first, so the FID can be tracked while the GAN trains
    t0 = time.perf_counter()
    extractor = train_extractor(x, y, n_classes, p, ctx.seed, device)
    real_feats, _ = features_and_classes(extractor, x[y == target], device)
    extractor_val_acc = None
    val_target_rate = None
    val_feats = real_feats[:0]
    if len(xv):
        vf, vp = features_and_classes(extractor, xv, device)
        extractor_val_acc = float((vp == yv).float().mean())
        val_feats = vf[yv == target]
        if len(val_target):
            val_target_rate = float((vp[yv == target] == target).float().mean())
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
        cfg = gan_config(size, int(x.shape[1]), len(classes), latent_dim=p.latent_dim, g_channels=p.g_channels,
                         d_channels=p.d_channels, d_norm=p.d_norm, minibatch_std=p.minibatch_std,
                         g_upsample=p.g_upsample)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    g_net = build_generator(cfg, seed=ctx.seed).to(device)
    d_net = build_discriminator(cfg, seed=ctx.seed + 1).to(device)
    ema = copy.deepcopy(g_net).eval()
    opt_g = torch.optim.Adam(g_net.parameters(), lr=p.lr_g, betas=(p.beta1, 0.999))
    opt_d = torch.optim.Adam(d_net.parameters(), lr=p.lr_d, betas=(p.beta1, 0.999))
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    batch = min(p.batch_size, len(gx))
    target_idx = torch.full((p.n_eval,), index_of[target], dtype=torch.long)

    d_loss_fn, g_loss_fn = (d_hinge_loss, g_hinge_loss) if p.loss == "hinge" else (d_bce_loss, g_bce_loss)

    def aug(t: Any) -> Any:
        return diff_augment(t, gen, flip_axis=p.flip_axis) if p.diffaugment else t

    def finish_ema() -> None:  # the averaged weights get their own batch-norm statistics, the same way every time
        recalibrate_batchnorm(ema, gy, torch.Generator().manual_seed(ctx.seed + 5))

    def eval_fid() -> float | None:
        finish_ema()
        fake = ema.sample(target_idx, torch.Generator().manual_seed(ctx.seed + 3)).cpu()
        return fid(real_feats, features_and_classes(extractor, fake, device)[0])

    history: list[dict[str, Any]] = []
    if p.fid_every:
        history.append({"epoch": 0, "d_loss": None, "g_loss": None, "d_real": None, "d_fake": None,
                        "fid": _round(eval_fid()), "seconds": 0.0})
    step = 0
    t_train = time.perf_counter()
    with ctx.progress("Training GAN", p.epochs) as advance:
        for epoch in range(1, p.epochs + 1):
            g_net.train()
            perm = torch.randperm(len(gx), generator=gen)
            n_batches = max(1, len(gx) // batch)  # drop the last partial batch: batch norm needs a full one
            sums = np.zeros(4)
            for b in range(n_batches):
                idx = perm[b * batch:(b + 1) * batch]
                real, cls = gx[idx].to(device), gy[idx].to(device)
                z = torch.randn(len(idx), p.latent_dim, generator=gen).to(device)
                with torch.no_grad():
                    fake = g_net(z, cls)
                d_real, d_fake = d_net(aug(real), cls), d_net(aug(fake), cls)
                loss_d = d_loss_fn(d_real, d_fake)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                z = torch.randn(len(idx), p.latent_dim, generator=gen).to(device)
                loss_g = g_loss_fn(d_net(aug(g_net(z, cls)), cls))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                step += 1
                update_ema(ema, g_net, min(p.ema_decay, step / (step + 1)))  # warm-up: the mean of all iterates
                sums += [loss_d.item(), loss_g.item(), d_real.mean().item(), d_fake.mean().item()]
            row: dict[str, Any] = dict(zip(["d_loss", "g_loss", "d_real", "d_fake"],
                                           [round(v, 5) for v in (sums / n_batches).tolist()], strict=True))
            row = {"epoch": epoch, **row, "fid": None, "seconds": round(time.perf_counter() - t_train, 2)}
            if p.fid_every and (epoch % p.fid_every == 0 or epoch == p.epochs):
                row["fid"] = _round(eval_fid())
                ctx.log.info("epoch %d/%d: D %.3f, G %.3f, FID %s", epoch, p.epochs, row["d_loss"], row["g_loss"],
                             row["fid"])
            history.append(row)
            if not all(math.isfinite(row[k]) for k in ("d_loss", "g_loss")):
                raise StageError(f"the GAN diverged at epoch {epoch} (loss not finite); lower lr_g / lr_d")
            advance(1)
    train_seconds = time.perf_counter() - t_train

    # the score of the final (moving-average) generator
    finish_ema()
    fake = ema.sample(target_idx, torch.Generator().manual_seed(ctx.seed + 3)).cpu()
    fake_feats, fake_pred = features_and_classes(extractor, fake, device)
    gan_fid = fid(real_feats, fake_feats)
    matched = matched_fid(real_feats, fake_feats, len(val_feats), ctx.seed)
    target_rate = float((fake_pred == target).float().mean())
    ctx.log.info("GAN: %d epochs in %.0f s; FID %s (matched to the val sample: %s; real-vs-real reference %s); "
                 "%.1f%% of generated images classified as %s", p.epochs, train_seconds, _round(gan_fid),
                 _round(matched), _round(reference), 100 * target_rate, names[target])

    # pictures and tables
    grid_rows: list[tuple[str, np.ndarray]] = []
    pick = torch.Generator().manual_seed(ctx.seed + 4)
    for c in classes:
        real_c = x[y == c]
        real_c = real_c[torch.randperm(len(real_c), generator=pick)[:p.grid]]
        fake_c = ema.sample(torch.full((p.grid,), index_of[c], dtype=torch.long), pick).cpu()
        grid_rows += [(f"real {c}\n{names[c]}", real_c.numpy()), (f"generated {c}\n{names[c]}", fake_c.numpy())]
    samples_png(ctx.stage_dir / "samples.png", grid_rows,
                f"train_gan: {p.epochs} epochs, FID (class {target}) {_round(gan_fid)}, "
                f"real-vs-real {_round(reference)}")
    write_csv_atomic(ctx.stage_dir / "history.csv", history,
                     ["epoch", "d_loss", "g_loss", "d_real", "d_fake", "fid", "seconds"])
    curve_png(history, ctx.stage_dir / "curve.png",
              f"{'conditional ' if len(classes) > 1 else ''}DCGAN on {len(gx)} train images: FID (class {target}) "
              f"{_round(gan_fid)}, real-vs-real {_round(reference)}")

    metrics = {"gan_fid": _round(gan_fid), "gan_fid_matched": _round(matched),
               "gan_fid_real_reference": _round(reference), "gan_target_class_rate": round(target_rate, 4),
               "gan_target_class_rate_real_val": _round(val_target_rate),
               "gan_extractor_val_accuracy": _round(extractor_val_acc), "gan_target_class": target,
               "gan_train_seconds": round(train_seconds, 2),
               "gan_seconds": round(time.perf_counter() - t_start, 2)}
    out = ctx.stage_dir / "generator.pt"
    save_checkpoint(out, {
        "format": GAN_FORMAT, "version": GAN_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "model": cfg, "classes": list(classes), "class_names": {str(k): v for k, v in names.items()},
        "image_size": size, "in_channels": int(x.shape[1]), "target_class": target, "seed": ctx.seed,
        "epochs": p.epochs, "datalist": str(dl_path), "value_range": [-1.0, 1.0], "metrics": metrics,
    })
    metrics["gan_seconds"] = round(time.perf_counter() - t_start, 2)
    return StageResult(outputs={"generator": str(out)}, metrics=metrics, inputs={str(dl_path): sha256_file(dl_path)})
