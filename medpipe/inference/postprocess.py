"""Post-processing of predicted class maps: removal of small connected components.

A component is a 26-connected region of foreground (any class > 0, so a blob made of several classes is
one component: right for tumour sub-regions, where a small core inside the edema is part of the tumour);
with ``per_class`` it is a connected region of one class (right for organs, where a stray island of
"kidney" next to the liver is an error of its own). Components below ``min_ml`` millilitres are set to
background, and with ``min_fraction`` also those below that fraction of the largest component of the
same region (organs: a false island of 30 mL is small next to a 300 mL kidney, while both kidneys, or both
lungs, are of a size). The model package's ``inference`` (``min_component_ml``, ``components``:
``foreground`` or ``class``, ``min_component_fraction``) says how; ``evaluate``, ``predict`` and
``medpipe score`` apply the same setting, so the masks written are the masks scored.
"""

from __future__ import annotations

import numpy as np


def remove_small_components(mask: np.ndarray, voxel_ml: float, min_ml: float | None, *, per_class: bool = False,
                            min_fraction: float | None = None) -> tuple[np.ndarray, int]:
    """``(mask without the small components, how many were removed)``: those below ``min_ml`` mL or below
    ``min_fraction`` of the largest component of their region.

    ``voxel_ml``: the volume of one voxel in mL. ``min_ml`` None or 0: nothing is removed (whatever
    ``min_fraction``). ``per_class``: components of each class on their own (else of the whole foreground).
    The input is not modified.
    """
    if not min_ml or min_ml <= 0 or not mask.any():
        return mask, 0
    regions = [mask == c for c in np.unique(mask) if c > 0] if per_class else [mask > 0]
    out, removed = mask, 0
    for region in regions:
        drop, n = _small(region, voxel_ml, float(min_ml), min_fraction or 0.0)
        if n:
            out = out.copy() if out is mask else out
            out[drop] = 0
            removed += n
    return out, removed


def _small(region: np.ndarray, voxel_ml: float, min_ml: float, min_fraction: float) -> tuple[np.ndarray, int]:
    """(voxels of the 26-connected components of ``region`` below ``min_ml`` mL or below ``min_fraction`` of the
    largest one, how many such components)."""
    from scipy import ndimage

    labels, n = ndimage.label(region, structure=np.ones((3,) * region.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_ml
    limit = max(min_ml, min_fraction * float(sizes.max())) if sizes.size else min_ml
    small = np.flatnonzero(sizes < limit) + 1
    return np.isin(labels, small), int(small.size)
