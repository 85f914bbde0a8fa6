"""The default MONAI transform lists of the training stages (as YAML-able specs)."""

from __future__ import annotations

from typing import Any

SEGMENTER_KEYS = ["image", "label"]


def segmenter_eval_transforms() -> list[dict[str, Any]]:
    """Load the channels, RAS orientation, per-channel z-score, crop to the head (voxels above the mean)."""
    return [
        {"LoadImaged": {"keys": SEGMENTER_KEYS}},
        {"EnsureChannelFirstd": {"keys": SEGMENTER_KEYS}},
        {"Orientationd": {"keys": SEGMENTER_KEYS, "axcodes": "RAS"}},
        {"NormalizeIntensityd": {"keys": "image", "channel_wise": True}},
        {"CropForegroundd": {"keys": SEGMENTER_KEYS, "source_key": "image", "margin": 4, "allow_smaller": True}},
    ]


def segmenter_train_transforms(roi_size: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The eval transforms, then patches of ``roi_size`` (half centred on foreground) and light augmentation."""
    roi = list(roi_size)
    return [
        *segmenter_eval_transforms(),
        {"SpatialPadd": {"keys": SEGMENTER_KEYS, "spatial_size": roi}},
        {"RandCropByPosNegLabeld": {"keys": SEGMENTER_KEYS, "label_key": "label", "spatial_size": roi, "pos": 1, "neg": 1,
                                    "num_samples": 2}},
        {"RandFlipd": {"keys": SEGMENTER_KEYS, "prob": 0.5, "spatial_axis": 0}},
        {"RandScaleIntensityd": {"keys": "image", "factors": 0.1, "prob": 0.5}},
        {"RandShiftIntensityd": {"keys": "image", "offsets": 0.1, "prob": 0.5}},
    ]


CLASSIFIER_KEYS = ["image"]


def classifier_eval_transforms(spatial_dims: int, spatial_size: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """2D: load, channel first, intensities to [0, 1]. 3D: also RAS orientation, per-channel z-score
    over the body (non-zero voxels), a crop to the body. Both: resized to ``spatial_size`` when given."""
    out: list[dict[str, Any]] = [{"LoadImaged": {"keys": CLASSIFIER_KEYS}}, {"EnsureChannelFirstd": {"keys": CLASSIFIER_KEYS}}]
    if spatial_dims == 2:
        out.append({"ScaleIntensityd": {"keys": CLASSIFIER_KEYS, "minv": 0.0, "maxv": 1.0}})
    else:
        out += [{"Orientationd": {"keys": CLASSIFIER_KEYS, "axcodes": "RAS"}},
                {"NormalizeIntensityd": {"keys": CLASSIFIER_KEYS, "nonzero": True, "channel_wise": True}},
                {"CropForegroundd": {"keys": CLASSIFIER_KEYS, "source_key": "image", "margin": 2, "allow_smaller": True}}]
    if spatial_size is not None:
        out.append({"Resized": {"keys": CLASSIFIER_KEYS, "spatial_size": list(spatial_size),
                                "mode": "bilinear" if spatial_dims == 2 else "trilinear"}})
    return out


def classifier_train_transforms(spatial_dims: int, spatial_size: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """The eval transforms, then left-right flips, a small random affine and intensity jitter."""
    affine: dict[str, Any] = {"keys": CLASSIFIER_KEYS, "prob": 0.5, "padding_mode": "zeros",
                              "mode": "bilinear"}
    if spatial_dims == 2:
        affine.update(rotate_range=0.26, scale_range=0.1, translate_range=2)
    else:
        affine.update(rotate_range=[0.0, 0.0, 0.17], scale_range=0.1, translate_range=2)
    return [
        *classifier_eval_transforms(spatial_dims, spatial_size),
        {"RandFlipd": {"keys": CLASSIFIER_KEYS, "prob": 0.5, "spatial_axis": 0}},
        {"RandAffined": affine},
        {"RandScaleIntensityd": {"keys": CLASSIFIER_KEYS, "factors": 0.1, "prob": 0.5}},
        {"RandShiftIntensityd": {"keys": CLASSIFIER_KEYS, "offsets": 0.05, "prob": 0.5}},
    ]
