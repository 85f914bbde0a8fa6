"""8-bit images as files that MONAI's loaders read back exactly (PNG in the loader's axis convention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpipe.io import atomic_path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Generator output in ``[-1, 1]`` -> 8-bit ``0..255`` (rounded, clipped)."""
    return np.clip(np.rint((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_png(array: np.ndarray, path: Path) -> None:
    """Write a ``(C, W, H)`` uint8 array (the loader's convention) so that ``LoadImaged`` reads back ``array``.

    MONAI's PIL reader returns an image transposed (``(W, H[, C])``), so the file holds ``array.T``.
    """
    from PIL import Image

    if array.ndim != 3 or array.shape[0] not in (1, 3) or array.dtype != np.uint8:
        raise ValueError(f"expected a (1 or 3, W, H) uint8 array, got {array.shape} {array.dtype}")
    image = Image.fromarray(np.ascontiguousarray(array[0].T), mode="L") if array.shape[0] == 1 else \
        Image.fromarray(np.ascontiguousarray(array.transpose(2, 1, 0)), mode="RGB")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
