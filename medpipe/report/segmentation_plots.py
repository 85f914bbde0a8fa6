"""Pictures of segmentations: axial overlays of truth and prediction on the image.

Colour-blind safe: the truth is outlined in Okabe-Ito sky blue (solid), the prediction in orange
(dashed), both over a thin black halo so they show on dark and bright tissue alike; the legend names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medpipe.io import atomic_path
from medpipe.report import colours


def _axial(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` reordered to RAS+ axes (so ``[..., k]`` is an axial slice)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(data, ornt)


def overlay_png(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, affine: np.ndarray, path: Path,
                title: str) -> int:
    """Write an axial overlay (radiological: patient's right on the left) of the slice with most tumour.

    Returns the slice index (RAS order) shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img, t, p = (_axial(a, affine) for a in (image, truth > 0, pred > 0))
    area = t.sum(axis=(0, 1)) if t.any() else p.sum(axis=(0, 1))
    k = int(np.argmax(area)) if area.any() else img.shape[2] // 2

    def view(a: np.ndarray) -> np.ndarray:  # [row, col]: anterior up, patient's right on the left
        return a[::-1, ::-1, k].T

    vi = view(img).astype(np.float32)
    lo, hi = np.percentile(vi, [1, 99.5]) if vi.size else (0, 1)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))[nib_axes(affine)]  # along R, A, S
    aspect = float(zooms[1] / zooms[0]) if zooms[0] else 1.0  # rows run along A, columns along R
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3), dpi=100)
    for ax, contours in zip(axes, (False, True), strict=True):
        ax.imshow(vi, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if contours:
            _outline(ax, view(t), colours.TRUTH, "solid")
            _outline(ax, view(p), colours.PREDICTION, "dashed")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, va="center")
        ax.text(0.96, 0.5, "L", color="yellow", transform=ax.transAxes, va="center")
    axes[1].set_title(f"truth ({colours.TRUTH_NAME}), prediction ({colours.PREDICTION_NAME})", fontsize=9)
    axes[1].legend(handles=[_legend_line(colours.TRUTH, "solid", "truth"),
                            _legend_line(colours.PREDICTION, "dashed", "prediction")],
                   loc="lower right", fontsize=8, framealpha=0.8)
    axes[0].set_title(f"axial slice {k}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return k


def _halo() -> list:
    import matplotlib.patheffects as pe

    return [pe.Stroke(linewidth=3.2, foreground="black"), pe.Normal()]


def _outline(ax: Any, mask: np.ndarray, colour: str, style: str) -> None:
    """The boundary of ``mask`` (rows, columns) as a contour line over a black halo (nothing for an empty mask)."""
    if not mask.any():
        return
    cs = ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.6, linestyles=style)
    cs.set(path_effects=_halo())


def _legend_line(colour: str, style: str, label: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, linestyle=style, linewidth=1.6, label=label, path_effects=_halo())


def nib_axes(affine: np.ndarray) -> np.ndarray:
    """For each RAS axis, the array axis that runs along it."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    order = np.empty(3, dtype=int)
    for array_axis, (ras_axis, _) in enumerate(ornt):
        order[int(ras_axis)] = array_axis
    return order


def per_label_png(per_label: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Per class (organ): mean Dice and mean HD95 (mm) with their bootstrap 95 % CIs as error bars, one row
    per class, with the number of cases each mean is over. A class without a defined value shows "n/a"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_label)
    rows = max(1, len(names))
    fig, axes = plt.subplots(1, 2, figsize=(9, 1.2 + 0.38 * rows), dpi=100, sharey=True)
    ypos = np.arange(len(names))[::-1]
    for ax, key, label, colour in ((axes[0], "dice", "Dice", colours.BLUE),
                                   (axes[1], "hd95", "HD95 (mm)", colours.VERMILLION)):
        for y, name in zip(ypos, names, strict=True):
            m = per_label[name]
            value, ci = m.get(key), m.get(f"{key}_ci95") or [None, None]
            n = m.get("n" if key == "dice" else "n_hd95", m.get("n"))
            if value is None:
                ax.text(0.02, y, "n/a", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
                continue
            if ci[0] is not None and ci[1] is not None:
                ax.errorbar([value], [y], xerr=[[value - ci[0]], [ci[1] - value]], fmt="o", color=colour,
                            capsize=3, markersize=5)
            else:
                ax.plot([value], [y], "o", color=colour, markersize=5)
            ax.annotate(f"{value:.3g} (n={n})", (value, y), textcoords="offset points", xytext=(6, 5), fontsize=7)
        ax.set_xlabel(f"{label}, mean and 95 % CI (bootstrap)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_xlim(0.0, 1.05)
    axes[0].set_yticks(ypos)
    axes[0].set_yticklabels(names, fontsize=9)
    axes[1].set_xlim(left=0.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
