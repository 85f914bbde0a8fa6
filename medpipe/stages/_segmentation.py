"""What the segmentation stages share: labels -> classes, checkpoints, datasets, inference on the source grid.

Not a stage (nothing is registered here); ``train_segmenter``, ``evaluate`` and ``predict`` import it.

**Classes.** ``target: whole_tumor`` trains one foreground class (every label value > 0);
``target: multiclass`` trains one class per label value (``label_map`` may merge or drop values:
``{label value: class index}``, values not listed become background). The checkpoint stores this, so
``evaluate`` and ``predict`` map ground truth and name outputs exactly as training did.

**Geometry.** Inference runs on the eval transforms' output (e.g. reoriented, resampled, cropped);
the class probabilities are resampled back onto the reference volume's grid through the affines
that MONAI tracks (``MetaTensor.affine``, voxel -> RAS world), with zeros outside the transformed
field of view, and the argmax is taken there. So masks and scores are always on the source grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from medpipe.errors import StageError
from medpipe.stages._common import read_checkpoint

CHECKPOINT_FORMAT = "medpipe-segmenter"
CHECKPOINT_VERSION = 1

Target = Literal["whole_tumor", "multiclass"]


# -- classes ----------------------------------------------------------------------------------------


def label_info(target: Target, label_map: dict[int, int] | None, label_names: dict[str, str] | None) -> dict[str, Any]:
    """``{"target", "label_map": {value: class}, "classes": {class: name}}`` (JSON-able; class 0 = background)."""
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) > 0}
    if target == "whole_tumor":
        return {"target": target, "label_map": None, "classes": {"1": "whole tumour"}}
    if label_map:
        mapping = {int(k): int(v) for k, v in label_map.items()}
        classes: dict[str, str] = {}
        for value, cls in sorted(mapping.items(), key=lambda kv: (kv[1], kv[0])):
            if cls > 0:
                name = names.get(value, f"label {value}")
                classes[str(cls)] = f"{classes[str(cls)]} + {name}" if str(cls) in classes else name
        n = max(mapping.values(), default=0)
        missing = [c for c in range(1, n + 1) if str(c) not in classes]
        if missing:
            raise StageError(f"label_map: classes must be numbered 1..{n} without gaps; {missing} unused")
        return {"target": target, "label_map": {str(k): v for k, v in mapping.items()}, "classes": classes}
    if not names:
        raise StageError("target multiclass: the datalist names no labels (label_names); give label_map")
    n = max(names)
    return {"target": target, "label_map": None,
            "classes": {str(c): names.get(c, f"label {c}") for c in range(1, n + 1)}}


def n_classes(info: dict[str, Any]) -> int:
    """Number of network outputs (background included)."""
    return 1 + len(info["classes"])


def map_labels(label: Any, info: dict[str, Any]) -> Any:
    """Integer label values -> class indices (torch tensor or numpy array, same type and shape back)."""
    import torch

    is_torch = isinstance(label, torch.Tensor)
    arr = label.round().long() if is_torch else np.rint(np.asarray(label)).astype(np.int64)
    if info["target"] == "whole_tumor":
        return (arr > 0).long() if is_torch else (arr > 0).astype(np.int64)
    if info.get("label_map"):
        mapping = {int(k): int(v) for k, v in info["label_map"].items()}
        top_value = (int(arr.max()) if arr.numel() else 0) if is_torch else (int(arr.max()) if arr.size else 0)
        size = max(max(mapping), top_value, 0) + 1
        lut_np = np.zeros(size, dtype=np.int64)
        for k, v in mapping.items():
            if k >= 0:
                lut_np[k] = v
        if is_torch:
            return torch.as_tensor(lut_np, device=arr.device)[arr.clamp(min=0)]
        return lut_np[np.clip(arr, 0, None)]
    top = len(info["classes"])
    if is_torch:
        return torch.where(arr > top, torch.zeros_like(arr), arr.clamp(min=0))
    return np.where(arr > top, 0, np.clip(arr, 0, None))


# -- inputs -------------------------------------------------------------------------------------------


def split_items(doc: dict[str, Any], split: str, *, need_labels: bool, path: Path) -> list[dict[str, Any]]:
    items = doc.get(split, []) if split != "all" else [*doc.get("train", []), *doc.get("val", []), *doc.get("test", [])]
    if need_labels:
        items = [it for it in items if it.get("label")]
    if not items:
        what = "labelled " if need_labels else ""
        raise StageError(f"the {split} split of {path} has no {what}studies; change the dataset stage's split")
    return items


# -- checkpoints --------------------------------------------------------------------------------------


def load_checkpoint(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """``(network in eval mode on device, checkpoint document)``; loads tensors only (``weights_only``)."""

    from medpipe.models.segmentation import build_from_config

    doc = read_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "medpipe segmenter checkpoint")
    net = build_from_config(doc["model"])
    net.load_state_dict(doc["state_dict"])
    net.to(device).eval()
    return net, doc


# -- inference on the source grid ---------------------------------------------------------------------


def grid_of(path: Path | str) -> Any:
    from medpipe.data.volumes import read_grid

    return read_grid(path)


def probabilities_on_grid(prob: Any, affine: Any, grid: Any) -> np.ndarray:
    """Resample class probabilities ``(C, ...)`` (voxel -> RAS ``affine``) onto ``grid``: ``(C, *grid.shape)``.

    Trilinear; zero outside the transformed field of view (so such voxels become background).
    """
    from medpipe.data.volumes import resample_to_grid

    p = prob.detach().cpu().numpy() if hasattr(prob, "detach") else np.asarray(prob)
    a = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    if a.ndim == 3:
        a = a[0]
    if p.shape[1:] == tuple(grid.shape) and np.allclose(a, grid.affine, atol=1e-4):
        return p.astype(np.float32, copy=False)
    return np.stack([resample_to_grid(c.astype(np.float32), a, grid, order=1, cval=0.0) for c in p])


def segment_item(net: Any, data: dict[str, Any], grid: Any, roi_size: tuple[int, ...], *, device: str, amp: bool,
                 tta: bool, sw_batch_size: int = 4, overlap: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """``(class map, probabilities)`` on ``grid`` for one transformed item (``data["image"]``: ``(C, ...)``)."""
    from monai.data import MetaTensor

    from medpipe.models.segmentation import infer_probabilities

    image = data["image"]
    affine = image.affine if isinstance(image, MetaTensor) else None
    if affine is None:
        raise StageError("the eval transforms lost the image geometry (no affine); keep MONAI's metadata "
                         "(do not end with ToNumpyd / EnsureTyped(track_meta=False))")
    tensor = image.as_tensor() if isinstance(image, MetaTensor) else image
    prob = infer_probabilities(net, tensor[None].float(), roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                               tta=tta, device=device, amp=amp)[0]
    native = probabilities_on_grid(prob, affine, grid)
    return native.argmax(0).astype(np.uint8), native

