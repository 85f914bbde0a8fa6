"""Classification networks (pure torch / MONAI: no file I/O).

:class:`ClassifierConfig` is the typed configuration (its JSON form, :meth:`ClassifierConfig.to_dict`
or :func:`classifier_config`, is stored in checkpoints) and :func:`build_classifier` makes the network
from it alone; :class:`ClassifierOptions` holds the architecture choices and their defaults, which
``train_classifier``'s parameters inherit:

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
from typing import Any, Literal, get_args

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from medpipe.models.base import NetworkConfig, Options

ClassifierName = Literal["densenet121", "resnet18", "resnet34", "resnet50", "efficientnet-b0", "cnn_rnn"]
#: the classifier networks (one list: the stage parameters and the builders both use :data:`ClassifierName`)
CLASSIFIERS: tuple[str, ...] = get_args(ClassifierName)

_RESNET_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3]}
_RESNET_BLOCK = {"resnet10": "basic", "resnet18": "basic", "resnet34": "basic", "resnet50": "bottleneck"}
_RESNET_WIDTHS = [64, 128, 256, 512]

#: the layer whose activations Grad-CAM explains, per network (``named_modules`` name)
CAM_LAYERS = {"densenet121": "class_layers.relu", "resnet18": "layer4", "resnet34": "layer4",
              "resnet50": "layer4", "efficientnet-b0": "_swish", "cnn_rnn": "encoder.layer4"}


class ClassifierOptions(Options):
    """A classifier's architecture choices and their defaults (``train_classifier`` parameters by these names)."""

    stem: Literal["standard", "small"] = Field("standard", description="resnet / cnn_rnn: small = 3x3 conv, no "
                                                                       "max pool (for images of about 32 px)")
    stem_stride: int = Field(1, ge=1, le=4, description="stride of the small stem's convolution")
    widen_factor: float = Field(1.0, gt=0, description="resnet / cnn_rnn encoder width multiplier")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: Literal["batch", "instance", "group"] = Field("batch", description="normalisation layers; instance or "
                                                        "group for 3D networks trained with a few volumes per batch")
    encoder: Literal["resnet10", "resnet18", "resnet34"] = Field("resnet18", description="cnn_rnn slice encoder")
    rnn: Literal["gru", "lstm"] = "gru"
    rnn_hidden: int = Field(64, ge=1)
    rnn_layers: int = Field(1, ge=1)


class ClassifierConfig(NetworkConfig, ClassifierOptions):
    """Everything :func:`build_classifier` needs. Stored in checkpoints as :meth:`to_dict` (the options that
    apply to ``name`` only: ``stem`` etc. for ResNets and ``cnn_rnn``, ``encoder`` / ``rnn*`` for ``cnn_rnn``)."""

    name: ClassifierName
    spatial_dims: int
    in_channels: int
    num_classes: int

    @field_validator("name", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if v not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {v!r}; choose one of {', '.join(CLASSIFIERS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.name == "cnn_rnn" and self.spatial_dims != 3:
            raise ValueError("cnn_rnn reads a volume as a sequence of 2D slices: it needs 3D inputs")
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(f"need at least 1 input channel and 2 classes (got {self.in_channels}, {self.num_classes})")
        return self

    def to_dict(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"name": self.name, "spatial_dims": self.spatial_dims, "in_channels": self.in_channels,
                               "num_classes": self.num_classes, "dropout": self.dropout, "norm": self.norm}
        if self.name.startswith("resnet") or self.name == "cnn_rnn":
            cfg.update(stem=self.stem, stem_stride=self.stem_stride, widen_factor=self.widen_factor)
        if self.name == "cnn_rnn":
            cfg.update(encoder=self.encoder, rnn=self.rnn, rnn_hidden=self.rnn_hidden, rnn_layers=self.rnn_layers)
        return cfg


def classifier_config(name: str, spatial_dims: int, in_channels: int, num_classes: int, **options: Any
                      ) -> dict[str, Any]:
    """The stored form of a :class:`ClassifierConfig` (checked, defaults filled in); ``options``: those of
    :class:`ClassifierOptions`.

    Raises:
        TypeError: an unknown option.
        ValueError: a bad value (one line per problem).
    """
    unknown = sorted(set(options) - set(ClassifierOptions.model_fields))
    if unknown:
        raise TypeError(f"unknown classifier option(s) {', '.join(unknown)}")
    return ClassifierConfig.from_dict({"name": name, "spatial_dims": spatial_dims, "in_channels": in_channels,
                                       "num_classes": num_classes, **options}).to_dict()


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
