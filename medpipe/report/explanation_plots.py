"""PNG figures of explanation maps (Grad-CAM, Grad-CAM++, occlusion) over the image they explain.

* 2D: one row: the image, then the image with each method's map overlaid (cividis: perceptually uniform
  and colour-blind safe, unlike jet's red-green rainbow; semi-transparent, with a colour bar).
* 3D: a montage: the first row the image, then one row per method; the columns are chosen axial
  slices (the last array axis), each titled with its index and, for ``cnn_rnn``, the model's
  attention weight of that slice.

Orientation: 2D arrays come from MONAI's readers with the first axis horizontal (its PIL reader
reverses numpy's row/column order), so they are shown transposed, which restores the PNG's own
layout. 3D volumes are in RAS+ order after the default ``Orientationd(axcodes="RAS")`` and are shown
like the ``evaluate`` stage's overlays: anterior up, the patient's right on the left (radiological).

matplotlib is imported lazily with the Agg backend; every PNG is written atomically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medpipe.io import atomic_path
from medpipe.report.colours import HEATMAP

__all__ = ["METHOD_TITLES", "choose_slices", "explanation_png"]

METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "occlusion"}
ALPHA = 0.45
DPI = 100


@contextlib.contextmanager
def _figure(path: Path | str, nrows: int, ncols: int, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """Yield ``(fig, 2D array of axes)``; on success write the PNG atomically. Always closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, dpi=DPI, squeeze=False, layout="constrained")
    try:
        yield fig, axes
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _solid() -> Any:
    """The maps' colour scale without their transparency (for colour bars)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap=HEATMAP)


def _display(image: np.ndarray, channel: int | None) -> np.ndarray:
    """``(C, *spatial)`` -> what is shown: one channel, or RGB (``(*spatial, 3)``) for 3-channel 2D images."""
    image = np.asarray(image, dtype=np.float32)
    if channel is None and image.ndim == 3 and image.shape[0] == 3:
        rgb = np.moveaxis(image, 0, -1)
        lo, hi = float(rgb.min()), float(rgb.max())
        return (rgb - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb)
    c = 0 if channel is None else channel
    if not 0 <= c < image.shape[0]:
        raise ValueError(f"channel {c} does not exist (the image has {image.shape[0]})")
    return image[c]


def _window(a: np.ndarray) -> tuple[float, float]:
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(a, [1, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def choose_slices(maps: Mapping[str, np.ndarray], image: np.ndarray, n: int,
                  how: Literal["strongest", "even"] = "strongest") -> list[int]:
    """Axial slices (indices along the last axis of ``(H, W, D)`` maps) to show, ascending.

    ``strongest``: greedily the slices where the methods' average map peaks highest, at least
    ``D / (2 n)`` slices apart (so the montage does not show one blob eight times); ``even``: evenly
    spaced between the first and last slice with any non-zero voxel of ``image`` (``(C, H, W, D)``:
    the body, as the default 3D transforms leave the background at 0).
    """
    depth = int(np.asarray(next(iter(maps.values()))).shape[-1]) if maps else int(image.shape[-1])
    if n >= depth:
        return list(range(depth))
    if how == "even" or not maps:
        body = np.flatnonzero(np.abs(np.asarray(image)).reshape(-1, depth).max(axis=0) > 0)
        lo, hi = (int(body[0]), int(body[-1])) if body.size else (0, depth - 1)
        return sorted({round(float(v)) for v in np.linspace(lo, hi, n)})
    mean = np.mean([np.asarray(m, dtype=np.float64) for m in maps.values()], axis=0)
    flat = mean.reshape(-1, depth)
    score = flat.max(axis=0) + 1e-3 * flat.mean(axis=0)
    gap = max(1, depth // (2 * n))
    chosen: list[int] = []
    for k in np.argsort(-score, kind="stable"):
        if len(chosen) == n:
            break
        if all(abs(int(k) - c) >= gap for c in chosen):
            chosen.append(int(k))
    for k in np.argsort(-score, kind="stable"):  # too few far-apart slices: fill up by score
        if len(chosen) == n:
            break
        if int(k) not in chosen:
            chosen.append(int(k))
    return sorted(chosen)


def explanation_png(path: Path | str, image: np.ndarray, maps: Mapping[str, np.ndarray], title: str, *,
                    spacing: Sequence[float] | None = None, slices: Sequence[int] | None = None, n_slices: int = 8,
                    slice_choice: Literal["strongest", "even"] = "strongest",
                    attention: Sequence[float] | np.ndarray | None = None, channel: int | None = None) -> list[int]:
    """Write the explanation figure of one case; return the slices shown (3D) or ``[]`` (2D).

    Args:
        image: ``(C, *spatial)``, as the network saw it.
        maps: ``{method: map of the image's spatial size, in [0, 1]}``.
        spacing: voxel size per spatial axis (pixel aspect); None: isotropic.
        slices: 3D: the axial slices to show; None: :func:`choose_slices` (``n_slices``, ``slice_choice``).
        attention: 3D ``cnn_rnn``: the attention weight of every slice, written under the slice index.
        channel: which image channel to show; None: colour for 3-channel 2D images, else channel 0.
    """
    image = np.asarray(image)
    spatial = image.shape[1:]
    for m, a in maps.items():
        if np.asarray(a).shape != spatial:
            raise ValueError(f"the {m} map has shape {np.asarray(a).shape}, the image {spatial}")
    sp = [1.0] * len(spatial) if spacing is None else [float(s) for s in spacing]
    if len(spatial) == 2:
        _png_2d(path, _display(image, channel), maps, title, sp)
        return []
    if len(spatial) != 3:
        raise ValueError(f"expected a 2D or 3D image with a channel axis, got shape {image.shape}")
    shown = list(slices) if slices is not None else choose_slices(maps, image, n_slices, slice_choice)
    _png_3d(path, _display(image, channel), maps, title, sp, shown, attention)
    return shown


def _png_2d(path: Path | str, img: np.ndarray, maps: Mapping[str, np.ndarray], title: str,
            spacing: list[float]) -> None:
    rgb = img.ndim == 3
    shown = np.swapaxes(img, 0, 1)  # rows = second array axis, as in the PNG (see module docstring)
    aspect = spacing[1] / spacing[0] if spacing[0] else 1.0
    lo, hi = (0.0, 1.0) if rgb else _window(img)
    n = 1 + len(maps)
    with _figure(path, 1, n, (3.0 * n + 0.6, 3.6)) as (fig, axes):
        for j, ax in enumerate(axes[0]):
            ax.imshow(shown, cmap=None if rgb else "gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title("image", fontsize=9)
                continue
            method = list(maps)[j - 1]
            ax.imshow(np.asarray(maps[method]).T, cmap=HEATMAP, alpha=ALPHA, vmin=0.0, vmax=1.0, aspect=aspect,
                           interpolation="bilinear")
            ax.set_title(METHOD_TITLES.get(method, method), fontsize=9)
            fig.colorbar(_solid(), ax=ax, fraction=0.046, pad=0.03)
        fig.suptitle(title, fontsize=9)


def _png_3d(path: Path | str, vol: np.ndarray, maps: Mapping[str, np.ndarray], title: str, spacing: list[float],
            slices: list[int], attention: Sequence[float] | np.ndarray | None) -> None:
    def view(a: np.ndarray, k: int) -> np.ndarray:  # [row, col]: anterior up, patient's right on the left
        return np.asarray(a)[::-1, ::-1, k].T

    lo, hi = _window(vol)
    aspect = spacing[1] / spacing[0] if spacing[0] else 1.0
    att = None if attention is None else np.asarray(attention, dtype=np.float64).reshape(-1)
    rows = ["image", *maps]
    ncols = max(1, len(slices))
    with _figure(path, len(rows), ncols, (1.7 * ncols + 1.4, 1.75 * len(rows) + 0.7)) as (fig, axes):
        for r, row in enumerate(rows):
            for c, k in enumerate(slices):
                ax = axes[r, c]
                ax.imshow(view(vol, k), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
                if row != "image":
                    ax.imshow(view(maps[row], k), cmap=HEATMAP, alpha=ALPHA, vmin=0.0, vmax=1.0, aspect=aspect,
                                   interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    label = f"slice {k}"
                    if att is not None and k < att.size:
                        label += f"\nattention {att[k]:.2f}"
                    ax.set_title(label, fontsize=8)
                if c == 0:
                    ax.set_ylabel(METHOD_TITLES.get(row, row), fontsize=9)
        if len(rows) > 1:
            fig.colorbar(_solid(), ax=axes[1:, :].ravel().tolist(), fraction=0.02, pad=0.01,
                         label="relative importance")
        fig.suptitle(title, fontsize=9)
