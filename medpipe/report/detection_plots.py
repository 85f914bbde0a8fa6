"""Detection figures: the FROC curve (sensitivity against false positives per scan, log scale) with the CPM's
operating points marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe.report import colours
from medpipe.report.training_plots import _save


def froc_png(curve: Any, path: Path, title: str, ci: dict[str, tuple[float, float]] | None = None) -> None:
    """The FROC curve of a :class:`medpipe.metrics.detection.Froc` (step curve) and its sensitivities at the
    CPM's rates (dots, with their bootstrap 95 % intervals from ``ci`` as bars when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rates = np.array(list(curve.at_rates))
    sens = np.array(list(curve.at_rates.values()))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    fps = np.maximum(curve.fps, rates.min() / 2)  # the (0, 0) point drawn at the left edge of the log axis
    ax.step(fps, curve.sensitivity, where="post", color=colours.BLUE, label="FROC")
    if ci:
        lo = np.array([ci.get(f"sens@{r:g}", (np.nan, np.nan))[0] for r in rates])
        hi = np.array([ci.get(f"sens@{r:g}", (np.nan, np.nan))[1] for r in rates])
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(rates[ok], sens[ok], yerr=[sens[ok] - lo[ok], hi[ok] - sens[ok]], fmt="none",
                    ecolor=colours.ORANGE, capsize=3, alpha=0.8)
    ax.plot(rates, sens, "o", color=colours.ORANGE, ms=5, label="sensitivity at the CPM's rates")
    ax.set_xscale("log", base=2)
    ax.set_xlim(rates.min() / 2, max(rates.max() * 2, float(curve.fps.max()) * 1.2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
