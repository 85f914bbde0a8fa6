"""Classification networks (pure torch / MONAI: no file I/O).

:func:`build_classifier` makes the network from its configuration alone
(:class:`~medpipe.models.classification_config.ClassifierConfig` or its stored JSON form, torch-free so that
``medpipe validate`` need not import torch):

* ``densenet121``, ``resnet18`` / ``resnet34`` / ``resnet50``, ``efficientnet-b0``: MONAI's networks,
  2D or 3D (``spatial_dims``), never with downloaded weights. ``stem: small`` replaces the ResNet
  stem (7x7 convolution with stride 2 + max pooling, made for 224 px photographs) by a 3x3 convolution
  with stride ``stem_stride`` and no pooling, as the MedMNIST and CIFAR ResNets do for 28-32 px
  images; ``widen_factor`` scales the ResNet's widths.
* ``cnn_rnn`` (:class:`SliceSequenceClassifier`): a 2D ResNet encoder applied to every slice of a
  volume, a bidirectional GRU or LSTM over the slice sequence, attention pooling over slices and a
  linear head: a study-level label from a volume without a 3D CNN's memory.

Every network returns class logits ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medpipe.models.classification_config import ClassifierConfig

_RESNET_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3]}
_RESNET_BLOCK = {"resnet10": "basic", "resnet18": "basic", "resnet34": "basic", "resnet50": "bottleneck"}
_RESNET_WIDTHS = [64, 128, 256, 512]


def norm_spec(norm: str) -> str | tuple[str, dict[str, Any]]:
    """MONAI's norm argument for ``batch`` / ``instance`` (with affine) / ``group`` (8 groups).

    Batch norm estimates its statistics from the batch, which is noisy for 3D classifiers trained
    with 2-4 volumes per batch; instance and group norm do not depend on the batch size.
    """
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "group":
        return ("group", {"num_groups": 8})
    return "batch"


def _resnet(kind: str, spatial_dims: int, in_channels: int, num_classes: int, stem: str, stem_stride: int,
            widen_factor: float, feed_forward: bool = True, norm: str = "batch") -> nn.Module:
    from monai.networks.nets import ResNet

    small = stem == "small"
    return ResNet(
        _RESNET_BLOCK[kind], _RESNET_LAYERS[kind], _RESNET_WIDTHS, spatial_dims=spatial_dims,
        n_input_channels=in_channels, conv1_t_size=3 if small else 7, conv1_t_stride=stem_stride if small else 2,
        no_max_pool=small, widen_factor=widen_factor, num_classes=num_classes, feed_forward=feed_forward,
        norm=norm_spec(norm),
    )


def build_classifier(config: dict[str, Any] | ClassifierConfig) -> nn.Module:
    """The network of a :class:`ClassifierConfig` or its stored dictionary (random weights; nothing is downloaded)."""
    cfg = ClassifierConfig.from_dict(config).to_dict()
    name, dims, cin, ncls = cfg["name"], int(cfg["spatial_dims"]), int(cfg["in_channels"]), int(cfg["num_classes"])
    dropout = float(cfg.get("dropout", 0.0))
    norm = str(cfg.get("norm", "batch"))
    if name == "densenet121":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=dims, in_channels=cin, out_channels=ncls, dropout_prob=dropout,
                           norm=norm_spec(norm))
    if name == "efficientnet-b0":
        from monai.networks.nets import EfficientNetBN

        eff_norm = ("batch", {"eps": 0.001, "momentum": 0.01}) if norm == "batch" else norm_spec(norm)
        net: Any = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=dims, in_channels=cin, num_classes=ncls,
                             norm=eff_norm)
        if dropout:
            net._dropout = nn.Dropout(dropout)
        return net
    if name == "cnn_rnn":
        return SliceSequenceClassifier(cfg)
    resnet: Any = _resnet(name, dims, cin, ncls, cfg.get("stem", "standard"), int(cfg.get("stem_stride", 1)),
                          float(cfg.get("widen_factor", 1.0)), norm=norm)
    if dropout:
        resnet.fc = nn.Sequential(nn.Dropout(dropout), resnet.fc)
    return resnet


def check_input_size(net: nn.Module, input_shape: Sequence[int]) -> None:
    """Run one zero input of ``(C, *spatial)`` through ``net`` (eval mode) to catch too-small images.

    Raises:
        ValueError: the network cannot take this size (the message says what to change).
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *[int(s) for s in input_shape]))
    except RuntimeError as exc:
        raise ValueError(f"the network cannot take inputs of size {list(input_shape)[1:]} ({str(exc).splitlines()[0]}); "
                         "make the images larger (e.g. a Resized transform to 32 px or more) or use a "
                         "small stem (resnet*, stem: small)") from None
    finally:
        net.train(was_training)


class SliceSequenceClassifier(nn.Module):
    """2D CNN per slice -> bidirectional GRU/LSTM over slices -> attention pooling -> logits.

    Input ``(B, C, H, W, D)``: slices are taken along the last spatial axis (the superior-inferior
    axis after ``Orientationd(axcodes="RAS")``). The attention weights of the last forward pass
    (``(B, D)``, summing to 1 over slices) are kept in :attr:`last_attention`: which slices the
    model based its decision on.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = _resnet(cfg.get("encoder", "resnet18"), 2, int(cfg["in_channels"]), 1, cfg.get("stem", "small"),
                               int(cfg.get("stem_stride", 1)), float(cfg.get("widen_factor", 1.0)), feed_forward=False,
                               norm=str(cfg.get("norm", "batch")))
        expansion = 4 if _RESNET_BLOCK[cfg.get("encoder", "resnet18")] == "bottleneck" else 1
        features = int(_RESNET_WIDTHS[-1] * float(cfg.get("widen_factor", 1.0))) * expansion
        hidden = int(cfg.get("rnn_hidden", 64))
        rnn_cls = nn.LSTM if cfg.get("rnn", "gru") == "lstm" else nn.GRU
        self.rnn = rnn_cls(features, hidden, num_layers=int(cfg.get("rnn_layers", 1)), batch_first=True,
                           bidirectional=True)
        self.attention = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.head = nn.Sequential(nn.Dropout(float(cfg.get("dropout", 0.0))), nn.Linear(2 * hidden, int(cfg["num_classes"])))
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"cnn_rnn expects (batch, channels, H, W, slices), got shape {tuple(x.shape)}")
        b, c, h, w, d = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        feats = self.encoder(slices).reshape(b, d, -1)
        seq, _ = self.rnn(feats)
        weights = torch.softmax(self.attention(seq).squeeze(-1), dim=1)
        self.last_attention = weights.detach()
        pooled = (weights.unsqueeze(-1) * seq).sum(dim=1)
        return self.head(pooled)
