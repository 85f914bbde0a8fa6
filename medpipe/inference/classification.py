"""Classifier inference: class probabilities averaged over ensemble members and flip views."""

from __future__ import annotations

from typing import Any

import numpy as np

from medpipe.errors import StageError


def flip_views(x: Any, tta_axes: list[int] | None) -> list[Any]:
    """``x`` and its flips along each of ``tta_axes`` (spatial axes, 0-based; None: no TTA)."""
    views = [x]
    for a in tta_axes or []:
        views.append(x.flip(2 + a))
    return views


def predict_proba(nets: list[Any], dataset: Any, *, device: str, amp: bool = False, tta_axes: list[int] | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """Class probabilities ``(N, C)``: softmax averaged over ensemble members and flip views."""
    import torch
    from monai.data import DataLoader

    from medpipe.models.segmentation import autocast

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for batch in loader:
            x = batch["image"]
            x = (x.as_tensor() if hasattr(x, "as_tensor") else x).float().to(device)
            total = None
            n = 0
            for net in nets:
                for view in flip_views(x, tta_axes):
                    with autocast(device, amp):
                        p = torch.softmax(net(view).float(), dim=1)
                    total = p if total is None else total + p
                    n += 1
            assert total is not None
            out.append((total / n).cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def valid_tta_axes(axes: list[int] | None, spatial_dims: int) -> list[int] | None:
    if axes is None:
        return None
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad:
        raise StageError(f"tta_axes: {bad} are not spatial axes of {spatial_dims}D images (0..{spatial_dims - 1})")
    return list(axes)
