"""Segmentation inference on the source grid.

Inference runs on the eval transforms' output (e.g. reoriented, resampled, cropped); the class
probabilities are resampled back onto the reference volume's grid through the affines that MONAI
tracks (``MetaTensor.affine``, voxel -> RAS world), with zeros outside the transformed field of view,
and the argmax is taken there. So masks and scores are always on the source grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import StageError


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
