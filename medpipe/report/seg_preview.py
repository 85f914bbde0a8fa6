"""A PNG of a written DICOM SEG, read back from its file, over the source frames it references.

Drawn from the SEG file itself (not from the mask that was meant to be written), so the picture shows
what a viewer will show: a flipped, shifted or misregistered SEG looks wrong here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.io import atomic_path

#: the frames shown: the ones with the most segmented pixels
N_FRAMES = 3


def seg_preview_png(seg_path: Path, frames: Sequence[Any], full_dataset: Callable[[int], Any], path: Path,
                    *, title: str) -> list[int]:
    """Write the preview; return the indices (into ``frames``) of the frames shown.

    ``frames``: the source frames' geometry (:func:`medpipe.dicom.frames.frame_geometries`);
    ``full_dataset(i)``: the source dataset with pixels holding frame ``i``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pydicom

    from medpipe.dicom.sc import render_overlay, source_frame, source_window
    from medpipe.dicom.seg import seg_to_source_frames

    seg = pydicom.dcmread(seg_path)
    masks = seg_to_source_frames(seg, frames)  # (frames, rows, cols, segments)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    area = masks.reshape(len(frames), -1).sum(1)
    shown = sorted(int(i) for i in np.argsort(-area, kind="stable")[:N_FRAMES]) if area.any() \
        else [len(frames) // 2]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 4.0), dpi=100, squeeze=False)
    for ax, i in zip(axes[0], shown, strict=True):
        ds = full_dataset(i)
        image = source_frame(ds, frames[i].frame_number)
        window = source_window(ds, frames[i].frame_number, image)
        rgb = render_overlay(image, window, outline=masks[i].any(-1))
        ax.imshow(rgb, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        inside = [names.get(n + 1, str(n + 1)) for n in range(masks.shape[-1]) if masks[i, ..., n].any()]
        ax.set_title(f"frame {i + 1}/{len(frames)}: " + (", ".join(inside) or "nothing segmented"), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return shown
