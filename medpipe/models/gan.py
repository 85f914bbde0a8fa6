"""A class-conditional DCGAN for small 2D images (pure torch / MONAI: no file I/O).

:func:`build_generator` / :func:`build_discriminator` make the networks from their configuration alone
(:class:`~medpipe.models.gan_config.GanConfig` or its stored JSON form, torch-free), so a checkpoint
rebuilds its generator without the training code.

**Generator** ``(z, class) -> image`` in ``[-1, 1]``: the latent vector is concatenated with a learned
class embedding, a linear layer makes a ``(4 g, s/4, s/4)`` map, two 2x upsampling blocks (batch norm,
ReLU) double the size twice, and a 3x3 convolution + ``tanh`` gives the image. Hence the image size
must be divisible by 4 (28 -> 7 -> 14 -> 28; 32 -> 8 -> 16 -> 32). The upsampling is either DCGAN's
transposed convolution (kernel 4, stride 2) or ``resize``: nearest-neighbour 2x + a 3x3 convolution,
which avoids the checkerboard pattern of transposed convolutions (Odena et al., Distill 2016); on
BreastMNIST ``resize`` gave smoother, more varied samples for the same number of steps.

**Discriminator** ``(image, class) -> logit``: a projection discriminator (Miyato & Koyama, ICLR
2018): three convolutions (stride 2, 2, 1; LeakyReLU 0.2), then a convolution as large as the
remaining ``s/4`` map (DCGAN's last layer) gives a feature vector ``h``, and
``logit = w . h + embed(class) . h``. Every weight is spectrally normalised (Miyato et al., ICLR
2018; ``d_norm: batch`` instead puts batch norm after the second convolution, as DCGAN did). A
minibatch standard-deviation channel (Karras et al., ICLR 2018) lets it notice when a batch of
generated images lacks variety. Global sum pooling, the usual SNGAN ending, was tried first: it sees
only 18-pixel patches and cannot judge the layout of a 28-pixel image, and the generator collapsed to
near-identical images; the full-size last convolution fixed that.

**Why not MONAI's GAN networks.** ``monai.networks.nets.Generator`` / ``Discriminator`` are
unconditional (a class would have to be concatenated to the latent vector and to the image, a
weaker conditioning than the projection), use residual units with instance normalisation and PReLU,
and the discriminator ends in a sigmoid, which rules out the hinge loss. So the networks are
assembled from MONAI's ``monai.networks.blocks.Convolution`` (``is_transposed=True`` for the
transposed upsampling), which keeps MONAI's layer conventions where they fit, with the conditioning,
the minibatch statistics and the spectral norm added here.

**Stable training on a few hundred images** (what ``train_gan`` uses): spectral norm + hinge loss
(:func:`d_hinge_loss`, :func:`g_hinge_loss`; :func:`d_bce_loss` with one-sided label smoothing is
the alternative), differentiable augmentation of real *and* generated images before the
discriminator (:func:`diff_augment`, Zhao et al., NeurIPS 2020: the discriminator cannot simply
memorise the small training set), and an exponential moving average of the generator's weights
(:func:`update_ema`, with batch-norm statistics re-measured by :func:`recalibrate_batchnorm`) whose
samples are smoother than the last iterate's.

Seeded: the builders take a ``seed`` that fixes the initial weights without touching the global
random state, and the sampling / augmentation helpers take an explicit ``torch.Generator``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medpipe.models.gan_config import GanConfig


def _conv(cin: int, cout: int, *, kernel: int | tuple[int, int], stride: int, padding: int, transposed: bool = False,
          act: Any = None, norm: Any = None) -> nn.Module:
    from monai.networks.blocks import Convolution

    return Convolution(2, cin, cout, strides=stride, kernel_size=kernel, padding=padding,
                       output_padding=0 if transposed else None, is_transposed=transposed, act=act, norm=norm,
                       adn_ordering="NA", conv_only=act is None and norm is None, bias=True)


def _up(cin: int, cout: int, mode: str) -> nn.Module:
    """2x upsampling + batch norm + ReLU: a transposed convolution (kernel 4), or nearest-neighbour resizing and
    a 3x3 convolution (``resize``: no checkerboard artefacts, Odena et al., Distill 2016; 2.25x the operations)."""
    if mode == "transposed":
        return _conv(cin, cout, kernel=4, stride=2, padding=1, transposed=True, act="RELU", norm="BATCH")
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         _conv(cin, cout, kernel=3, stride=1, padding=1, act="RELU", norm="BATCH"))


class ConditionalGenerator(nn.Module):
    """``(z (B, latent_dim), y (B,) class indices) -> images (B, C, H, W)`` in ``[-1, 1]``."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        g, h, w = int(cfg["g_channels"]), *[int(s) // 4 for s in cfg["image_size"]]
        self.start = (4 * g, h, w)
        self.embed = nn.Embedding(int(cfg["num_classes"]), int(cfg["embed_dim"]))
        self.fc = nn.Linear(int(cfg["latent_dim"]) + int(cfg["embed_dim"]), 4 * g * h * w)
        self.fc_norm = nn.Sequential(nn.BatchNorm2d(4 * g), nn.ReLU(inplace=True))
        self.up = nn.Sequential(_up(4 * g, 2 * g, cfg.get("g_upsample", "transposed")),
                                _up(2 * g, g, cfg.get("g_upsample", "transposed")),
                                _conv(g, int(cfg["in_channels"]), kernel=3, stride=1, padding=1))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(z.shape[0], *self.start)
        return torch.tanh(self.up(self.fc_norm(x)))

    @torch.no_grad()
    def sample(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images of ``classes`` (a 1D tensor of class indices) from fresh latent vectors, on the net's device."""
        device = next(self.parameters()).device
        z = torch.randn(len(classes), int(self.cfg["latent_dim"]), generator=generator)
        return self(z.to(device), classes.long().to(device))


class ProjectionDiscriminator(nn.Module):
    """``(images (B, C, H, W), y (B,)) -> logits (B,)``: convolutions to a feature vector + class projection."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm

        d, c = int(cfg["d_channels"]), int(cfg["in_channels"])
        h4, w4 = (int(s) // 4 for s in cfg["image_size"])
        sn = cfg.get("d_norm", "spectral") == "spectral"
        self.minibatch_std = bool(cfg.get("minibatch_std", False))
        lrelu = ("leakyrelu", {"negative_slope": 0.2})
        self.down = nn.Sequential(
            _conv(c, d, kernel=4, stride=2, padding=1, act=lrelu),
            _conv(d, 2 * d, kernel=4, stride=2, padding=1, act=lrelu, norm=None if sn else "BATCH"))
        self.last = nn.Sequential(
            _conv(2 * d + int(self.minibatch_std), 4 * d, kernel=3, stride=1, padding=1, act=lrelu),
            # as large as the s/4 map (DCGAN's last layer): the discriminator sees where things are; global
            # pooling instead would judge a bag of 18-pixel patches, blind to the layout of the image
            _conv(4 * d, 4 * d, kernel=(h4, w4), stride=1, padding=0, act=lrelu))
        self.linear: nn.Module = nn.Linear(4 * d, 1)
        self.embed: nn.Module = nn.Embedding(int(cfg["num_classes"]), 4 * d)
        if sn:
            for block in [*self.down, *self.last]:
                spectral_norm(block.conv)
            self.linear, self.embed = spectral_norm(self.linear), spectral_norm(self.embed)
        else:
            nn.init.normal_(self.embed.weight, std=0.02)  # start close to an unconditional discriminator

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.minibatch_std:
            std = h.float().std(dim=0, unbiased=False).mean() if h.shape[0] > 1 else h.new_zeros(())
            h = torch.cat([h, std.to(h.dtype).expand(h.shape[0], 1, *h.shape[2:])], dim=1)
        h = self.last(h).flatten(1)
        return self.linear(h).squeeze(1) + (self.embed(y.long()) * h).sum(dim=1)


def _seeded(cls: type[nn.Module], cfg: dict[str, Any], seed: int | None) -> nn.Module:
    if seed is None:
        return cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def _checked(cfg: dict[str, Any] | GanConfig) -> dict[str, Any]:
    return GanConfig.from_dict(cfg).to_dict()


def build_generator(cfg: dict[str, Any] | GanConfig, seed: int | None = None) -> ConditionalGenerator:
    """The generator of a :func:`gan_config` dictionary (``seed``: fixed initial weights)."""
    return _seeded(ConditionalGenerator, _checked(cfg), seed)  # type: ignore[return-value]


def build_discriminator(cfg: dict[str, Any] | GanConfig, seed: int | None = None) -> ProjectionDiscriminator:
    """The discriminator of a :func:`gan_config` dictionary (``seed``: fixed initial weights)."""
    return _seeded(ProjectionDiscriminator, _checked(cfg), seed)  # type: ignore[return-value]


# -- training helpers ----------------------------------------------------------------------------------


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``."""
    return torch.relu(1.0 - real_logits).mean() + torch.relu(1.0 + fake_logits).mean()


def g_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: ``-E[D(fake)]``."""
    return -fake_logits.mean()


def d_bce_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, smooth: float = 0.1) -> torch.Tensor:
    """Discriminator cross-entropy with one-sided label smoothing (real targets ``1 - smooth``)."""
    bce = nn.functional.binary_cross_entropy_with_logits
    real = bce(real_logits, torch.full_like(real_logits, 1.0 - smooth))
    return real + bce(fake_logits, torch.zeros_like(fake_logits))


def g_bce_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: ``-log sigmoid(D(fake))``."""
    return nn.functional.softplus(-fake_logits).mean()


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None, *, translation: float = 0.125,
                 flip_axis: int | None = 0, color: bool = True, background: float = -1.0) -> torch.Tensor:
    """Differentiable augmentation (DiffAugment) of a batch in ``[-1, 1]``: the same policy is applied to real
    and generated images before the discriminator, so gradients flow through it to the generator.

    Per image: brightness (+-0.25) and contrast (x0.5..1.5) jitter (``color``), a flip along spatial axis
    ``flip_axis`` with probability 1/2 (None: no flips; use an axis along which the anatomy may be
    mirrored), and an integer translation by up to ``translation`` of the side, filled with ``background``.
    """
    b = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device)

    if color:
        x = x + (rand(b, 1, 1, 1) - 0.5) * 0.5
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (rand(b, 1, 1, 1) + 0.5) + mean
    if flip_axis is not None:
        flip = rand(b) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2 + flip_axis), x)
    if translation > 0:
        h, w = x.shape[2], x.shape[3]
        sh, sw = max(1, int(h * translation + 0.5)), max(1, int(w * translation + 0.5))
        dy = (rand(b) * (2 * sh + 1)).long() - sh
        dx = (rand(b) * (2 * sw + 1)).long() - sw
        padded = nn.functional.pad(x, (sw, sw, sh, sh), value=background)
        iy = (torch.arange(h, device=x.device)[None, :] + sh - dy[:, None]).clamp(0, h + 2 * sh - 1)
        ix = (torch.arange(w, device=x.device)[None, :] + sw - dx[:, None]).clamp(0, w + 2 * sw - 1)
        rows = padded.gather(2, iy[:, None, :, None].expand(b, x.shape[1], h, w + 2 * sw))
        x = rows.gather(3, ix[:, None, None, :].expand(b, x.shape[1], h, w))
    return x


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * net`` for the parameters (buffers: see :func:`recalibrate_batchnorm`)."""
    for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
        pe.lerp_(pn.detach(), 1.0 - decay)


@torch.no_grad()
def recalibrate_batchnorm(net: ConditionalGenerator, classes: torch.Tensor, generator: torch.Generator,
                          batches: int = 8, batch_size: int = 64) -> None:
    """Recompute the batch-norm statistics of ``net`` (e.g. a moving average of weights, whose own statistics
    were never measured) from ``batches`` batches of its own samples of random ``classes``; leaves it in eval mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    net.train()
    device = next(net.parameters()).device
    for _ in range(batches):
        pick = classes[torch.randint(len(classes), (batch_size,), generator=generator)]
        z = torch.randn(batch_size, int(net.cfg["latent_dim"]), generator=generator)
        net(z.to(device), pick.long().to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.eval()
