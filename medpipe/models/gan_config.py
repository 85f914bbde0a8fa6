"""What the conditional GAN is, without torch: the architecture options that ``train_gan``'s parameters
inherit and :class:`GanConfig`, whose JSON form (:func:`gan_config`) the generator checkpoint stores.
:mod:`medpipe.models.gan` builds the networks from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medpipe.models.base import NetworkConfig, Options, stored_config

GAN_FORMAT = "medpipe-gan-generator"


GAN_VERSION = 1


class GanOptions(Options):
    """The GAN's architecture choices and their defaults (``train_gan`` parameters by these names; tuned on
    BreastMNIST, 28 px)."""

    latent_dim: int = Field(default=64, ge=1, description="size of the generator's noise vector")
    g_channels: int = Field(default=16, ge=1, description="width of the generator's last layer (the others: 2x, 4x)")
    d_channels: int = Field(default=32, ge=1, description="width of the discriminator's first layer (others: 2x, 4x)")
    g_upsample: Literal["resize", "transposed"] = Field(
        default="resize", description="generator upsampling: resize (nearest 2x + 3x3 convolution: smoother, no "
                                      "checkerboard) or transposed convolutions (faster)")
    d_norm: Literal["spectral", "batch"] = Field(default="spectral", description="the discriminator's normalisation")
    minibatch_std: bool = Field(default=True, description="the discriminator sees each batch's spread (against "
                                                          "mode collapse)")


class GanConfig(NetworkConfig, GanOptions):
    """Everything the builders need; stored in the generator checkpoint as :meth:`to_dict`.

    ``image_size``: ``(H, W)``, each divisible by 4 (one side: square); ``embed_dim``: the generator's
    class embedding (None: ``latent_dim``, filled in).
    """

    image_size: tuple[int, int]
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    embed_dim: int | None = Field(default=None, ge=1)

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        size = [int(v), int(v)] if isinstance(v, int) else [int(s) for s in v]
        if len(size) != 2 or any(s < 4 or s % 4 for s in size):
            raise ValueError(f"image size {size} is not 2D with sides divisible by 4 (e.g. 28 or 32)")
        return size

    @model_validator(mode="after")
    def _embed(self) -> GanConfig:
        if self.embed_dim is None:
            self.embed_dim = self.latent_dim
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": list(self.image_size), "in_channels": self.in_channels, "num_classes": self.num_classes,
                "latent_dim": self.latent_dim, "g_channels": self.g_channels, "d_channels": self.d_channels,
                "embed_dim": self.embed_dim, "d_norm": self.d_norm, "minibatch_std": self.minibatch_std,
                "g_upsample": self.g_upsample}


def gan_config(image_size: int | Sequence[int], in_channels: int, num_classes: int, *, embed_dim: int | None = None,
               **options: Any) -> dict[str, Any]:
    """The stored form of a :class:`GanConfig` (checked, defaults filled in); ``options``: those of
    :class:`GanOptions`.

    Raises:
        TypeError: an unknown option.
        ValueError: a size not divisible by 4, fewer than 1 channel or class, non-positive widths, an unknown
            ``d_norm`` / ``g_upsample`` (one line per problem).
    """
    return stored_config(GanConfig, GanOptions, "GAN", {"image_size": image_size, "in_channels": in_channels,
                                                        "num_classes": num_classes, "embed_dim": embed_dim}, options)
