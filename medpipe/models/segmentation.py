"""Segmentation networks and sliding-window inference (pure torch / MONAI: no file I/O).

``build_segmenter`` makes a MONAI ``UNet`` or ``SegResNet`` from a small, JSON-able configuration
(the same dictionary is stored in checkpoints, so a network can be rebuilt from it alone);
``infer_logits`` runs sliding-window inference with optional flip test-time augmentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
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


def autocast(device: str, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA when ``enabled``; a no-op elsewhere."""
    if enabled and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


#: flips used by test-time augmentation (spatial axes of a ``(B, C, X, Y, Z)`` tensor)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((2,), (3,), (4,))


@torch.no_grad()
def infer_probabilities(
    net: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    tta: bool = False,
    device: str = "cpu",
    amp: bool = False,
) -> torch.Tensor:
    """Softmax probabilities ``(B, classes, ...)`` of ``image`` ``(B, C, ...)`` by sliding windows.

    With ``tta`` the probabilities are averaged over the image and its flips along each spatial axis.
    The result is a plain float32 tensor on the CPU.
    """
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    was_training = net.training
    net.eval()
    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    x = x.to(device)

    def run(t: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = cast(torch.Tensor, sliding_window_inference(t, list(roi_size), sw_batch_size, net, overlap=overlap,
                                                                 mode="gaussian"))
        return torch.softmax(logits.float(), dim=1)

    prob = run(x)
    if tta:
        for axes in TTA_FLIPS:
            prob += torch.flip(run(torch.flip(x, axes)), axes)
        prob /= 1 + len(TTA_FLIPS)
    if was_training:
        net.train()
    return prob.cpu()
