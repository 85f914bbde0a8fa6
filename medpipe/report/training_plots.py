"""Training figures: the loss / validation-metric curve of any trainer and a GAN's sample grid.

matplotlib is imported lazily with the Agg backend; figures are written atomically
(``medpipe.io.atomic_path``). Colours are Okabe-Ito (:mod:`medpipe.report.colours`: no red next to green),
and each loss has its own line style as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.io import atomic_path
from medpipe.report import colours

#: the losses' colours and styles; the validation metric is orange dots
_COLOURS = (colours.BLUE, colours.REDDISH_PURPLE, colours.BLUISH_GREEN, colours.BLACK)
_STYLES = ("-", "--", "-.", ":")
_METRIC = colours.ORANGE


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def curve_png(history: Sequence[dict[str, Any]], path: Path, title: str, *, metric: str, metric_label: str,
              losses: dict[str, str] | None = None, group: str | None = None,
              metric_range: tuple[float, float] | None = (0.0, 1.0)) -> None:
    """Training loss(es) per epoch (left axis) and the validation ``metric`` column (right axis, dots).

    ``losses``: loss column -> legend label (default ``{"loss": "train loss"}``); rows whose loss is
    None (e.g. an epoch-0 validation) are skipped. ``group``: a column (e.g. ``fold``) whose values
    get one line each. ``metric_range``: the right axis's limits (None: automatic).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = losses or {"loss": "train loss"}
    groups = sorted({h[group] for h in history}) if group else [None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for (col, name), colour, style in zip(losses.items(), _COLOURS, _STYLES, strict=False):
        for g in groups:
            rows = [h for h in history if (group is None or h[group] == g) and h.get(col) is not None]
            tag = f" ({group} {g})" if len(groups) > 1 else ""
            ax.plot([h["epoch"] for h in rows], [h[col] for h in rows], color=colour, linestyle=style, alpha=0.8,
                    label=f"{name}{tag}" if g == groups[0] or not tag else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss" if len(losses) == 1 else "loss", color=_COLOURS[0] if len(losses) == 1 else "black")
    if len(losses) > 1:
        ax.legend(loc="upper left", fontsize=8)
    points = [[(h["epoch"], h[metric]) for h in history if (group is None or h[group] == g)
               and h.get(metric) is not None] for g in groups]
    if any(points):
        ax2 = ax.twinx()
        for pts in points:
            if pts:
                ax2.plot(*zip(*pts, strict=True), "o-", color=_METRIC, ms=3, alpha=0.8)
        if metric_range is not None:
            ax2.set_ylim(*metric_range)
        ax2.set_ylabel(f"{metric_label} (orange dots)", color=_METRIC)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def _display(image: np.ndarray) -> np.ndarray:
    """``(C, W, H)`` in the loader's array convention (MONAI's PIL reader transposes) -> ``(H, W[, C])`` in [0, 1]."""
    a = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
    return a[0].T if a.shape[0] == 1 else a.transpose(2, 1, 0)


def samples_png(path: Path, rows: Sequence[tuple[str, np.ndarray]], title: str) -> None:
    """A grid of 2D images: one labelled row per ``(label, images (N, C, W, H) in [-1, 1])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.0 * ncol + 1.6, 1.05 * len(rows) + 0.5), dpi=100,
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for k in range(ncol):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < len(imgs):
                ax.imshow(_display(imgs[k]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
