"""What a detector is, without torch: the architecture options that ``train_detector``'s parameters inherit
and :class:`DetectorConfig`, which checkpoints store. :mod:`medpipe.models.detection` builds the network."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from medpipe.models.base import NetworkConfig, Options

Width = Annotated[int, Field(ge=1, le=1024)]
Blocks = Annotated[int, Field(ge=1, le=64)]
Stride = Annotated[int, Field(ge=1, le=4)]
AnchorShape = tuple[Annotated[float, Field(gt=0, le=1024)], Annotated[float, Field(gt=0, le=1024)],
                    Annotated[float, Field(gt=0, le=1024)]]


class DetectorOptions(Options):
    """A detector's architecture choices (``train_detector`` parameters by these names)."""

    widths: tuple[Width, Width, Width, Width] = Field((8, 16, 32, 64), description="ResNet features per layer 1-4 "
                                                                                     "(each twice the last)")
    blocks: tuple[Blocks, Blocks, Blocks, Blocks] = Field((1, 1, 1, 1), description="residual blocks per ResNet layer")
    fpn_channels: Width = Field(16, description="features of every FPN level (and of the heads)")
    returned_layers: tuple[Annotated[int, Field(ge=1, le=4)], ...] = Field(
        (1, 2), min_length=1, description="ResNet layers the FPN takes (small targets: low layers)")
    conv1_stride: tuple[Stride, Stride, Stride] = Field((1, 1, 1), description="stride of the first convolution")
    anchor_shapes: tuple[AnchorShape, ...] = Field(
        ((2, 2, 2), (4, 4, 4)), min_length=1,
        description="anchor sizes (voxels) at the finest level; doubled at every coarser level")

    @model_validator(mode="after")
    def _check(self) -> DetectorOptions:
        if any(b != 2 * a for a, b in zip(self.widths, self.widths[1:], strict=False)):
            raise ValueError(f"widths must double from layer to layer (the FPN assumes it), got {list(self.widths)}")
        if list(self.returned_layers) != sorted(set(self.returned_layers)):
            raise ValueError(f"returned_layers must be increasing, got {list(self.returned_layers)}")
        return self


class DetectorConfig(NetworkConfig, DetectorOptions):
    """Everything :func:`build_detector` needs; stored in checkpoints as :meth:`to_dict`."""

    name: Literal["retinanet"] = "retinanet"
    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(1, ge=1)

    @property
    def size_divisible(self) -> tuple[int, int, int]:
        """Input sizes must be multiples of this (conv1 stride x max-pool x every layer's stride x the extra level)."""
        top = max(self.returned_layers)
        return tuple(int(s) * 2 * 2 ** top for s in self.conv1_stride)  # type: ignore[return-value]
