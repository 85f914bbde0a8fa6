"""Post-processing of predicted class maps: removal of small connected components.

A component is a 26-connected region of foreground (any class > 0, so a blob made of several classes is
one component); those below ``min_ml`` millilitres are set to background. ``evaluate``, ``predict``
and ``medpipe score`` apply the same setting (recorded in the checkpoint and the model package as
``inference.min_component_ml``), so the masks written are the masks scored.
"""

from __future__ import annotations

import numpy as np


def remove_small_components(mask: np.ndarray, voxel_ml: float, min_ml: float | None) -> tuple[np.ndarray, int]:
    """``(mask without the foreground components smaller than min_ml mL, how many were removed)``.

    ``voxel_ml``: the volume of one voxel in mL. ``min_ml`` None or 0: nothing is removed. The input is
    not modified.
    """
    if not min_ml or min_ml <= 0 or not mask.any():
        return mask, 0
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n == 0:
        return mask, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * float(voxel_ml)
    small = np.flatnonzero(sizes < float(min_ml)) + 1
    if small.size == 0:
        return mask, 0
    out = mask.copy()
    out[np.isin(labels, small)] = 0
    return out, int(small.size)
