"""Segmentation networks (pure torch / MONAI: no file I/O).

:class:`SegmenterConfig` is the typed configuration of a MONAI ``UNet`` or ``SegResNet`` (its JSON
form, :meth:`SegmenterConfig.to_dict`, is stored in checkpoints, so a network can be rebuilt from it
alone with :func:`build_from_config`); :class:`SegmenterOptions` holds the architecture choices and
their defaults, which ``train_segmenter``'s parameters inherit. Inference (sliding windows, test-time
augmentation, ensembles) is in :mod:`medpipe.inference.segmentation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from medpipe.models.base import NetworkConfig, Options, stored_config

if TYPE_CHECKING:
    from torch import nn

SegmenterName = Literal["unet", "segresnet"]
#: the segmentation networks (one list: the stage parameters and the builders both use :data:`SegmenterName`)
SEGMENTERS: tuple[str, ...] = get_args(SegmenterName)

#: keys of a segmenter configuration (what :meth:`SegmenterConfig.to_dict` returns and checkpoints hold)
CONFIG_KEYS = ("name", "in_channels", "out_channels", "channels", "strides", "num_res_units", "norm", "dropout")


class SegmenterOptions(Options):
    """A segmenter's architecture choices and their defaults (``train_segmenter`` parameters by these names)."""

    channels: tuple[Annotated[int, Field(ge=1, le=4096)], ...] = Field((16, 32, 64, 128), min_length=2, description="features per level")
    strides: tuple[Annotated[int, Field(ge=1, le=8)], ...] | None = Field(None, description="UNet downsampling per level; None: 2 everywhere")
    num_res_units: int = Field(0, ge=0)
    norm: Literal["instance", "batch", "group"] = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class SegmenterConfig(NetworkConfig, SegmenterOptions):
    """Everything :func:`build_segmenter` needs (``strides`` filled in); stored in checkpoints as :meth:`to_dict`."""

    name: SegmenterName
    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=1)

    @field_validator("name", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if v not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {v!r}; use {' or '.join(repr(n) for n in SEGMENTERS)}")
        return v

    @field_validator("channels", mode="before")
    @classmethod
    def _levels(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) < 2:
            raise ValueError(f"at least 2 levels are needed, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _strides(self) -> SegmenterConfig:
        if self.strides is None:
            self.strides = (2,) * (len(self.channels) - 1)
        if self.name == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides: a UNet with {len(self.channels)} levels needs {len(self.channels) - 1} "
                             f"strides, got {list(self.strides)}")
        if self.name == "segresnet" and any(s != 2 for s in self.strides):
            raise ValueError(f"strides: SegResNet always downsamples by 2 per level, got {list(self.strides)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "channels": list(self.channels), "strides": list(self.strides or ()),
                "num_res_units": self.num_res_units, "norm": self.norm, "dropout": self.dropout}


def segmenter_config(name: SegmenterName, in_channels: int, out_channels: int, **options: Any) -> dict[str, Any]:
    """The stored form of a :class:`SegmenterConfig` (checked, defaults filled in); ``options``: those of
    :class:`SegmenterOptions`.

    Raises:
        TypeError: an unknown option.
        ValueError: a bad value (one line per problem).
    """
    return stored_config(SegmenterConfig, SegmenterOptions, "segmenter",
                         {"name": name, "in_channels": in_channels, "out_channels": out_channels}, options)


def build_segmenter(name: SegmenterName, in_channels: int, out_channels: int, **options: Any) -> nn.Module:
    """A 3D MONAI segmentation network producing ``out_channels`` logits per voxel.

    ``unet``: ``monai.networks.nets.UNet`` with ``channels`` per level and ``strides`` between levels
    (``num_res_units`` residual units per block, ``norm``, ``dropout``).
    ``segresnet``: ``monai.networks.nets.SegResNet`` with ``init_filters = channels[0]`` and
    ``len(channels)`` levels (SegResNet doubles the filters and halves the size at every level, so only
    the first channel count and the number of levels are used; ``strides`` must be all 2).

    Keyword arguments are those of :class:`SegmenterOptions`; unknown ones raise ``TypeError``.
    """
    return build_from_config(segmenter_config(name, in_channels, out_channels, **options))


def build_from_config(config: dict[str, Any] | SegmenterConfig) -> nn.Module:
    """The network of a :class:`SegmenterConfig` or its stored dictionary (keys outside :data:`CONFIG_KEYS` are
    ignored, as in checkpoints of every version)."""
    if isinstance(config, dict):
        config = SegmenterConfig.from_dict({k: v for k, v in config.items() if k in CONFIG_KEYS})
    cfg = SegmenterConfig.from_dict(config).to_dict()
    if cfg["name"] == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            channels=tuple(cfg["channels"]), strides=tuple(cfg["strides"]), num_res_units=cfg["num_res_units"],
            norm=cfg["norm"], dropout=cfg["dropout"],
        )
    from monai.networks.nets import SegResNet

    levels = len(cfg["channels"])
    blocks_down = (1, 2, 2, 4, 4, 4)[:levels] if levels <= 6 else (1, 2, 2) + (4,) * (levels - 3)
    norm = cfg["norm"].lower()
    monai_norm: Any = ("GROUP", {"num_groups": min(8, cfg["channels"][0])}) if norm == "group" else norm.upper()
    return SegResNet(
        spatial_dims=3, init_filters=cfg["channels"][0], in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"], blocks_down=blocks_down, blocks_up=(1,) * (levels - 1),
        norm=monai_norm, dropout_prob=cfg["dropout"] or None,
    )
