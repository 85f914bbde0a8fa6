"""PNG figures for classification results: ROC curves, confusion matrix, reliability diagram.

matplotlib is imported lazily, with the Agg backend; every figure is small (5 x 5 in at 100 dpi) and
written atomically (``medpipe.io.atomic_path``), so a killed run never leaves a truncated PNG. Colours are
Okabe-Ito (:mod:`medpipe.report.colours`), with line styles cycling as well when classes outnumber colours.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medpipe.io import atomic_path
from medpipe.metrics.classification import (
    check_inputs,
    classification_metrics,
    confusion_matrix,
    reliability,
    roc_auc,
    roc_curve,
)
from medpipe.report import colours

__all__ = ["calibration_png", "confusion_png", "roc_png"]

FIGSIZE = (5.0, 5.0)
DPI = 100


@contextlib.contextmanager
def _figure(path: Path | str, nrows: int = 1, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """Yield ``(fig, axes)``; on success lay the figure out and write it to ``path`` atomically. Always closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, 1, figsize=FIGSIZE, dpi=DPI, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _name(class_names: dict[int, str] | None, k: int) -> str:
    return class_names.get(k, str(k)) if class_names else str(k)


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{nd}f}"


def _ci_text(ci: Sequence[float | None] | None) -> str:
    if ci is None or len(ci) != 2:
        return ""
    lo, hi = ci
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return ""
    return f" (95% CI {lo:.3f}-{hi:.3f})"


def roc_png(y_true: ArrayLike, prob: ArrayLike, path: Path | str, *, class_names: dict[int, str] | None = None,
            positive: int | None = None, title: str = "ROC curve", ci: Sequence[float | None] | None = None
            ) -> Path:
    """ROC curve(s) of ``prob`` (N, C) against ``y_true`` (N,), written to ``path`` as a PNG.

    Binary: the curve of ``prob[:, positive]`` (``positive`` defaults to 1) with its AUC, and ``ci`` (the
    AUC's confidence interval) if given, in the legend. Multi-class: one one-vs-rest curve per class with
    its AUC in the legend, and the macro AUC (with ``ci``, then that of the macro AUC) in the title. The
    chance diagonal is drawn. An undefined AUC (one class present) shows as ``n/a``.
    """
    y, p = check_inputs(y_true, prob)
    n_classes = p.shape[1]
    if n_classes > 2 and positive is not None:
        raise ValueError(f"positive applies to binary problems only, not to {n_classes} classes")
    pos = 1 if positive is None else int(positive)
    if n_classes == 2:
        auc = classification_metrics(y, p, positive=pos)["auc"]  # also validates positive
    with _figure(path) as (_, ax):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
        if n_classes == 2:
            fpr, tpr, _ = roc_curve(y == pos, p[:, pos])
            ax.plot(fpr, tpr, color=colours.BLUE, linewidth=2,
                    label=f"{_name(class_names, pos)}: AUC {_fmt(auc)}{_ci_text(ci)}")
        else:
            for k in range(n_classes):
                fpr, tpr, _ = roc_curve(y == k, p[:, k])
                colour, style = colours.cycle(k)
                ax.plot(fpr, tpr, color=colour, linestyle=style, linewidth=1.6,
                        label=f"{_name(class_names, k)} vs rest: AUC {_fmt(roc_auc(y == k, p[:, k]))}")
            title = f"{title}\nmacro AUC {_fmt(classification_metrics(y, p)['auc'])}{_ci_text(ci)}"
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel("sensitivity (true positive rate)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return Path(path)


def confusion_png(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int, path: Path | str, *,
                  class_names: dict[int, str] | None = None, title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows: truth, columns: prediction) with the count and the row percentage in each cell.

    Cells are shaded by the row-normalised fraction (so the diagonal shows each class's recall).
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(rows > 0, cm / np.where(rows > 0, rows, 1), np.nan)
    total = int(cm.sum())
    with _figure(path) as (_, ax):
        ax.imshow(np.nan_to_num(frac), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        font = 9 if n_classes <= 6 else 7
        for i in range(n_classes):
            for j in range(n_classes):
                f = float(frac[i, j])
                pct = "-" if math.isnan(f) else f"{100 * f:.1f}%"
                ax.text(j, i, f"{cm[i, j]}\n{pct}", ha="center", va="center", fontsize=font,
                        color="white" if f > 0.5 else "black")
        labels = [_name(class_names, k) for k in range(n_classes)]
        tilt = n_classes > 3 or any(len(s) > 8 for s in labels)
        ax.set_xticks(range(n_classes), labels, rotation=45 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=8)
        ax.set_yticks(range(n_classes), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = float(np.trace(cm)) / total if total else math.nan
        ax.set_title(f"{title}\naccuracy {_fmt(acc)} (n = {total})", fontsize=10)
    return Path(path)


def calibration_png(y_true: ArrayLike, prob: ArrayLike, path: Path | str, *, title: str = "Calibration",
                    n_bins: int = 10, positive: int | None = None, threshold: float | None = None) -> Path:
    """Reliability diagram of the confidence of the predicted label, with the ECE in the title.

    Top: accuracy per equal-width confidence bin (bars), the identity line (perfect calibration), each
    bin's mean confidence (dots) and the gap between the two (shaded). Bottom: histogram of the
    confidences. ``positive``/``threshold`` (binary only) define the predicted label as in
    ``classification_metrics``.
    """
    rel = reliability(y_true, prob, n_bins, positive=positive, threshold=threshold)
    edges, acc, conf, count = rel["edges"], rel["accuracy"], rel["confidence"], rel["count"]
    left, width = edges[:-1], np.diff(edges)
    filled = count > 0
    with _figure(path, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1]}) as (_, (ax, hist)):
        ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfect calibration")
        ax.bar(left[filled], acc[filled], width=width[filled], align="edge", color=colours.SKY_BLUE, edgecolor="black",
               linewidth=0.6, label="accuracy")
        lo = np.minimum(acc, conf)[filled]
        hi = np.maximum(acc, conf)[filled]
        ax.bar(left[filled], hi - lo, bottom=lo, width=width[filled], align="edge", facecolor=(0.835, 0.369, 0.0, 0.2),
               edgecolor=colours.VERMILLION, hatch="///", linewidth=0.6, label="gap")
        ax.bar(left[filled], acc[filled], width=width[filled], align="edge", fill=False, edgecolor="black",
               linewidth=0.9, zorder=3)  # the accuracy outline stays visible where the gap covers the bar
        ax.plot((left + width / 2)[filled], conf[filled], "o", color=colours.VERMILLION, markersize=3, zorder=4,
                label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE {_fmt(rel['ece'])}, n = {int(count.sum())}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
        hist.bar(left, count, width=width, align="edge", color="0.5", edgecolor="black", linewidth=0.5)
        hist.set_xlabel("confidence of the predicted class")
        hist.set_ylabel("cases")
        hist.set_xlim(0, 1)
    return Path(path)
