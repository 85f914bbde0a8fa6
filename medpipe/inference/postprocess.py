"""Post-processing of predicted class maps: removal of small connected components.

A component is a 26-connected region of foreground (any class > 0, so a blob made of several classes is
one component: right for tumour sub-regions, where a small core inside the edema is part of the tumour);
with ``per_class`` it is a connected region of one class (right for organs, where a stray island of
"kidney" next to the liver is an error of its own). Components below ``min_ml`` millilitres are set to
background; the model package's ``inference.components`` (``foreground`` or ``class``) says which. ``evaluate``, ``predict``
and ``medpipe score`` apply the same setting (recorded in the checkpoint and the model package as
``inference.min_component_ml``), so the masks written are the masks scored.
"""

from __future__ import annotations

import numpy as np


def remove_small_components(mask: np.ndarray, voxel_ml: float, min_ml: float | None, *, per_class: bool = False
                            ) -> tuple[np.ndarray, int]:
    """``(mask without the components smaller than min_ml mL, how many were removed)``.

    ``voxel_ml``: the volume of one voxel in mL. ``min_ml`` None or 0: nothing is removed. ``per_class``:
    components of each class on their own (else of the whole foreground). The input is not modified.
    """
    if not min_ml or min_ml <= 0 or not mask.any():
        return mask, 0
    regions = [mask == c for c in np.unique(mask) if c > 0] if per_class else [mask > 0]
    out, removed = mask, 0
    for region in regions:
        drop, n = _small(region, voxel_ml, float(min_ml))
        if n:
            out = out.copy() if out is mask else out
            out[drop] = 0
            removed += n
    return out, removed


def _small(region: np.ndarray, voxel_ml: float, min_ml: float) -> tuple[np.ndarray, int]:
    """(voxels of the 26-connected components of ``region`` below ``min_ml`` mL, how many such components)."""
    from scipy import ndimage

    labels, n = ndimage.label(region, structure=np.ones((3,) * region.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_ml
    small = np.flatnonzero(sizes < min_ml) + 1
    return np.isin(labels, small), int(small.size)
