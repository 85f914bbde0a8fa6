"""Detection data: findings (centre in world mm + diameter) as boxes, and the detector's MONAI transforms.

A datalist item of a detection dataset has ``findings``: ``[{center_lps: [x, y, z], diameter_mm: d}, ...]``
(from the DICOM SR's SCOORD3D points, :mod:`medpipe.data.datalist_builder`). A finding becomes a
box **in world space** (:func:`world_boxes`): the cube of side ``d`` around the centre, in RAS
(``cccwhd`` mode: centre and size), since the volumes medpipe writes are NIfTI with RAS affines.
MONAI's box transforms then put it in image voxels: ``ConvertBoxToStandardModed`` (to ``xyzxyz``)
and ``AffineBoxToImageCoordinated``, which applies the inverse of the image's affine *as it is after
the spatial transforms* (orientation to RAS, resampling, cropping): whatever the acquisition was
(axial, feet-first, prone, a gantry tilt resampled at ingest), the box lands on the same voxels as
the nodule. Box coordinates are continuous voxel indices (voxel centres at integers), so a box's
centre maps back to world space through the same affine (:func:`box_centres_world`).

The transforms (:func:`detector_transforms`) follow MONAI's LUNA16 detection tutorial: load,
channel first, RAS, resample to ``pixdim`` on a grid aligned with the world axes (``diagonal=True``:
a gantry-tilted series that ingest resampled onto an orthogonal but tilted grid is rotated back, so
boxes, which are axis-aligned in the image, are axis-aligned in the body too, and the two corners of
a box map exactly), HU window to [0, 1], crop to the body, boxes to image
coordinates; for training, ``RandCropBoxByPosNegLabeld`` patches (half of them holding a whole
nodule), random flips and 90-degree rotations of image and boxes together, boxes clipped to the
patch (``ClipBoxToImaged``), and intensity jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: DICOM patient coordinates (LPS) <-> NIfTI world coordinates (RAS)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
IMAGE, BOX, BOX_LABEL = "image", "box", "box_label"
#: HU above this is "body" when cropping to the body (air is about -1000, lung about -850)
BODY_HU = -500.0


def world_boxes(findings: Sequence[dict[str, Any]] | None) -> np.ndarray:
    """``(n, 6)`` boxes in RAS world mm, ``cccwhd`` (centre x y z, then size x y z): a cube of side ``diameter``."""
    rows = []
    for f in findings or []:
        c = LPS_TO_RAS @ np.asarray(f["center_lps"], dtype=np.float64)
        d = float(f["diameter_mm"])
        rows.append([*c, d, d, d])
    return np.asarray(rows, dtype=np.float32).reshape(-1, 6)


def detection_item(item: dict[str, Any]) -> dict[str, Any]:
    """A datalist item as the detector transforms take it: the image file, world boxes and their labels (0)."""
    image = item["image"]
    if isinstance(image, list):
        if len(image) != 1:
            raise ValueError(f"the detector takes one image channel, the item has {len(image)}")
        image = image[0]
    boxes = world_boxes(item.get("findings"))
    return {IMAGE: image, BOX: boxes, BOX_LABEL: np.zeros(len(boxes), dtype=np.int64),
            "case": item.get("study_uid") or item.get("patient_id") or str(image)}


def box_centres_world(boxes: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (LPS, mm) and diameters (mm: the mean of the three box sides) of ``xyzxyz`` boxes in the voxel
    coordinates of an image with the RAS ``affine``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    a = np.asarray(affine, dtype=np.float64)
    centre = (b[:, :3] + b[:, 3:]) / 2.0
    ras = centre @ a[:3, :3].T + a[:3, 3]
    sides = (b[:, 3:] - b[:, :3]) * np.linalg.norm(a[:3, :3], axis=0)
    return ras @ LPS_TO_RAS.T, sides.mean(axis=1)


def detector_transforms(*, pixdim: Sequence[float], hu_window: Sequence[float], train: bool,
                        patch_size: Sequence[int] = (64, 64, 64), num_samples: int = 2, pos: float = 1.0,
                        neg: float = 1.0, with_boxes: bool = True) -> Any:
    """The detector's transforms (a MONAI ``Compose``): ``train`` adds patches and augmentation; ``with_boxes=False``
    for images without findings to place (inference)."""
    from monai.apps.detection.transforms.dictionary import (
        AffineBoxToImageCoordinated,
        ClipBoxToImaged,
        ConvertBoxToStandardModed,
        RandCropBoxByPosNegLabeld,
        RandFlipBoxd,
        RandRotateBox90d,
        StandardizeEmptyBoxd,
    )
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    lo, hi = float(hu_window[0]), float(hu_window[1])
    body = (BODY_HU - lo) / (hi - lo)
    ts: list[Any] = [
        LoadImaged(keys=IMAGE, image_only=True),
        EnsureChannelFirstd(keys=IMAGE),
        EnsureTyped(keys=IMAGE, dtype=np.float32),
        Orientationd(keys=IMAGE, axcodes="RAS"),
        Spacingd(keys=IMAGE, pixdim=list(pixdim), mode="bilinear", diagonal=True),
        ScaleIntensityRanged(keys=IMAGE, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=IMAGE, source_key=IMAGE, select_fn=lambda x: x > body, margin=4, allow_smaller=True),
    ]
    if with_boxes:
        ts += [
            EnsureTyped(keys=BOX, dtype=np.float32),
            StandardizeEmptyBoxd(box_keys=BOX, box_ref_image_keys=IMAGE),
            ConvertBoxToStandardModed(box_keys=BOX, mode="cccwhd"),
            AffineBoxToImageCoordinated(box_keys=BOX, box_ref_image_keys=IMAGE),
        ]
    if train:
        ts += [
            SpatialPadd(keys=IMAGE, spatial_size=list(patch_size), method="end"),
            RandCropBoxByPosNegLabeld(image_keys=IMAGE, box_keys=BOX, label_keys=BOX_LABEL,
                                      spatial_size=list(patch_size), whole_box=True, num_samples=num_samples,
                                      pos=pos, neg=neg),
            *(RandFlipBoxd(image_keys=IMAGE, box_keys=BOX, box_ref_image_keys=IMAGE, prob=0.5, spatial_axis=a)
              for a in range(3)),
            RandRotateBox90d(image_keys=IMAGE, box_keys=BOX, box_ref_image_keys=IMAGE, prob=0.5, max_k=3,
                             spatial_axes=(0, 1)),
            ClipBoxToImaged(box_keys=BOX, label_keys=BOX_LABEL, box_ref_image_keys=IMAGE, remove_empty=True),
            RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.3),
            RandShiftIntensityd(keys=IMAGE, offsets=0.05, prob=0.3),
        ]
    return Compose(ts)


def plain(x: Any) -> Any:
    """A tensor without MONAI's metadata: a ``MetaTensor`` sends every operation through its ``__torch_function__``,
    which made a detector's training step several times slower than the convolutions in it."""
    import torch

    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def finding_items(doc: dict[str, Any], split: str, *, path: Any) -> list[dict[str, Any]]:
    """The items of ``split`` whose findings are known (``[]``: none; ``null``: unlabelled, left out)."""
    from medpipe.errors import StageError

    items = [it for it in doc.get(split, []) if it.get("findings") is not None]
    if not items:
        raise StageError(f"the {split} split of {path} has no studies with findings; build the datalist with labels "
                         "{source: sr} and check its split")
    return items
