"""Segmentation networks (pure torch / MONAI: no file I/O).

``build_segmenter`` makes a MONAI ``UNet`` or ``SegResNet`` from a small, JSON-able configuration
(the same dictionary is stored in checkpoints, so a network can be rebuilt from it alone).
Inference (sliding windows, test-time augmentation, ensembles) is in :mod:`medpipe.inference.segmentation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

SegmenterName = Literal["unet", "segresnet"]

#: keys of a segmenter configuration (what :func:`segmenter_config` returns and checkpoints hold)
CONFIG_KEYS = ("name", "in_channels", "out_channels", "channels", "strides", "num_res_units", "norm", "dropout")


def segmenter_config(
    name: SegmenterName,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] | None = None,
    num_res_units: int = 0,
    norm: str = "instance",
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The JSON-able configuration :func:`build_segmenter` accepts (defaults filled in)."""
    channels = [int(c) for c in channels]
    if len(channels) < 2:
        raise ValueError(f"channels: at least 2 levels are needed, got {channels}")
    strides = [2] * (len(channels) - 1) if strides is None else [int(s) for s in strides]
    if name == "unet" and len(strides) != len(channels) - 1:
        raise ValueError(f"strides: a UNet with {len(channels)} levels needs {len(channels) - 1} strides, got {strides}")
    if name not in ("unet", "segresnet"):
        raise ValueError(f"unknown segmenter {name!r}; use 'unet' or 'segresnet'")
    return {"name": name, "in_channels": int(in_channels), "out_channels": int(out_channels), "channels": channels,
            "strides": strides, "num_res_units": int(num_res_units), "norm": str(norm), "dropout": float(dropout)}


def build_segmenter(name: SegmenterName, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    """A 3D MONAI segmentation network producing ``out_channels`` logits per voxel.

    ``unet``: ``monai.networks.nets.UNet`` with ``channels`` per level and ``strides`` between levels
    (``num_res_units`` residual units per block, ``norm``, ``dropout``).
    ``segresnet``: ``monai.networks.nets.SegResNet`` with ``init_filters = channels[0]`` and
    ``len(channels)`` levels (SegResNet doubles the filters and halves the size at every level, so only
    the first channel count and the number of levels are used; ``strides`` must be all 2).

    Keyword arguments are those of :func:`segmenter_config`; unknown ones raise ``TypeError``.
    """
    cfg = segmenter_config(name, in_channels, out_channels, **kw)
    if cfg["name"] == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            channels=tuple(cfg["channels"]), strides=tuple(cfg["strides"]), num_res_units=cfg["num_res_units"],
            norm=cfg["norm"], dropout=cfg["dropout"],
        )
    from monai.networks.nets import SegResNet

    if any(s != 2 for s in cfg["strides"]):
        raise ValueError(f"strides: SegResNet always downsamples by 2 per level, got {cfg['strides']}")
    levels = len(cfg["channels"])
    blocks_down = (1, 2, 2, 4, 4, 4)[:levels] if levels <= 6 else (1, 2, 2) + (4,) * (levels - 3)
    norm = cfg["norm"].lower()
    monai_norm: Any = ("GROUP", {"num_groups": min(8, cfg["channels"][0])}) if norm == "group" else norm.upper()
    return SegResNet(
        spatial_dims=3, init_filters=cfg["channels"][0], in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"], blocks_down=blocks_down, blocks_up=(1,) * (levels - 1),
        norm=monai_norm, dropout_prob=cfg["dropout"] or None,
    )


def build_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Rebuild a network from a stored :func:`segmenter_config` dictionary."""
    kw = {k: v for k, v in cfg.items() if k in CONFIG_KEYS and k not in ("name", "in_channels", "out_channels")}
    return build_segmenter(cfg["name"], cfg["in_channels"], cfg["out_channels"], **kw)
