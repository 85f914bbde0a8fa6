"""Segmentation labels -> network classes.

``target: whole_tumor`` trains one foreground class (every label value > 0); ``target: multiclass``
trains one class per label value (``label_map`` may merge or drop values: ``{label value: class
index}``, values not listed become background). Checkpoints store the result of :func:`label_info`,
so evaluation, prediction and scoring map ground truth and name outputs exactly as training did.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from medpipe.errors import StageError

Target = Literal["whole_tumor", "multiclass"]


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
