"""GAN training pieces for :func:`medpipe.training.loop.fit`: the iteration, the images, the FID's feature extractor.

* :func:`load_images`: 2D datalist items as one tensor in ``[-1, 1]`` (the classifier's default eval
  transforms: intensities to ``[0, 1]`` per image, optionally resized).
* :class:`GanStep`: one adversarial iteration (a discriminator step, then a generator step, then the
  generator's moving average), every random draw from one ``torch.Generator``.
* :func:`gan_summary`: the epoch's mean losses and discriminator outputs, rounded to 5 digits.
* :func:`train_feature_extractor`: the small ResNet whose features the FID compares
  (:mod:`medpipe.metrics.generative`), trained from scratch on the real images with :func:`fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medpipe.errors import StageError
from medpipe.training.loop import Logs, ShuffledBatches, SupervisedStep, fit

GAN_COLUMNS = ("d_loss", "g_loss", "d_real", "d_fake")


def load_images(items: list[dict[str, Any]], size: int | None) -> tuple[Any, Any]:
    """``(images (N, C, H, W) in [-1, 1], classes (N,))`` of 2D items through the default eval transforms."""
    import torch

    from medpipe.data.datasets import make_dataset
    from medpipe.data.transform_defaults import classifier_eval_transforms

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


class GanStep:
    """One GAN iteration on a batch ``(real images, class indices)``.

    Discriminator: ``d_loss(D(aug(real)), D(aug(G(z))))`` with ``G(z)`` computed without gradients;
    generator: ``g_loss(D(aug(G(z'))))`` with fresh latents; then ``ema`` moves towards the generator
    (decay ``min(ema_decay, step / (step + 1))``: the mean of all iterates during warm-up). ``augment``
    (e.g. DiffAugment) is applied to real and generated images alike. The latents and the augmentation
    draw from ``generator`` only. Returns the two losses and the mean discriminator outputs.
    """

    def __init__(self, g_net: Any, d_net: Any, ema: Any, opt_g: Any, opt_d: Any, *, latent_dim: int, generator: Any,
                 d_loss: Callable[[Any, Any], Any], g_loss: Callable[[Any], Any], augment: Callable[[Any], Any],
                 ema_decay: float, device: str = "cpu") -> None:
        self.g_net, self.d_net, self.ema, self.opt_g, self.opt_d = g_net, d_net, ema, opt_g, opt_d
        self.latent_dim, self.generator, self.device = latent_dim, generator, device
        self.d_loss, self.g_loss, self.augment, self.ema_decay = d_loss, g_loss, augment, ema_decay
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        """The iteration count (the moving average's warm-up depends on it), for training snapshots."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def __call__(self, batch: tuple[Any, Any]) -> Logs:
        import torch

        from medpipe.models.gan import update_ema

        real, cls = batch[0].to(self.device), batch[1].to(self.device)
        z = torch.randn(len(real), self.latent_dim, generator=self.generator).to(self.device)
        with torch.no_grad():
            fake = self.g_net(z, cls)
        d_real, d_fake = self.d_net(self.augment(real), cls), self.d_net(self.augment(fake), cls)
        loss_d = self.d_loss(d_real, d_fake)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        z = torch.randn(len(real), self.latent_dim, generator=self.generator).to(self.device)
        loss_g = self.g_loss(self.d_net(self.augment(self.g_net(z, cls)), cls))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.step += 1
        update_ema(self.ema, self.g_net, min(self.ema_decay, self.step / (self.step + 1)))
        return dict(zip(GAN_COLUMNS, (loss_d.item(), loss_g.item(), d_real.mean().item(), d_fake.mean().item()),
                        strict=True))


def gan_summary(logs: Sequence[Logs]) -> dict[str, Any]:
    """The epoch's means of :data:`GAN_COLUMNS` (summed in iteration order), rounded to 5 digits."""
    sums = np.zeros(len(GAN_COLUMNS))
    for entry in logs:
        sums += [entry[k] for k in GAN_COLUMNS]
    return dict(zip(GAN_COLUMNS, [round(v, 5) for v in (sums / len(logs)).tolist()], strict=True))


def train_feature_extractor(x: Any, y: Any, n_classes: int, *, epochs: int, width: float, seed: int, device: str,
                            flip_axis: int | None = 0, batch_size: int = 64, lr: float = 2e-3) -> Any:
    """A small ResNet-18 (small stem, widen factor ``width``) trained from scratch on ``(x, y)``; in eval mode.

    Class-weighted cross-entropy, AdamW with a one-cycle schedule, DiffAugment (translation 0.1, flips
    along ``flip_axis``) as augmentation; its weights are seeded with ``seed`` and the shuffling and
    augmentation with ``seed + 1``, without touching the global random state.
    """
    import torch

    from medpipe.data.datalist import class_counts
    from medpipe.models.classification import build_classifier
    from medpipe.models.classification_config import classifier_config
    from medpipe.models.gan import diff_augment
    from medpipe.training.losses import make_loss

    n = max(n_classes, 2)
    cfg = classifier_config("resnet18", 2, int(x.shape[1]), n, stem="small", widen_factor=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_classifier(cfg).to(device)
    counts = class_counts([{"class": int(c)} for c in y.tolist()], n)
    loss_fn = make_loss("class_weights", counts).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * math.ceil(len(x) / batch_size))
    gen = torch.Generator().manual_seed(seed + 1)

    def augment(xb: Any, yb: Any) -> tuple[Any, Any]:
        return diff_augment(xb, gen, flip_axis=flip_axis, translation=0.1), yb

    def to_device(batch: tuple[Any, Any]) -> tuple[Any, Any]:
        return batch[0].to(device), batch[1].to(device)

    fit(SupervisedStep(net, loss_fn, opt, to_device, device=device), ShuffledBatches([x, y], batch_size, gen,
                                                                                      transform=augment),
        epochs=epochs, modules=[net], scheduler=sched, scheduler_step="iteration", label="feature extractor: ")
    return net.eval()
