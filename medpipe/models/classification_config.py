"""What a classifier is, without torch: the names, the architecture options that ``train_classifier``'s
parameters inherit, and :class:`ClassifierConfig`, whose JSON form (:func:`classifier_config`) checkpoints
and model packages store. :mod:`medpipe.models.classification` builds the networks from it."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from medpipe.models.base import NetworkConfig, Options, stored_config

ClassifierName = Literal["densenet121", "resnet18", "resnet34", "resnet50", "efficientnet-b0", "cnn_rnn"]


#: the classifier networks (one list: the stage parameters and the builders both use :data:`ClassifierName`)
CLASSIFIERS: tuple[str, ...] = get_args(ClassifierName)


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
    return stored_config(ClassifierConfig, ClassifierOptions, "classifier", {
        "name": name, "spatial_dims": spatial_dims, "in_channels": in_channels, "num_classes": num_classes}, options)
