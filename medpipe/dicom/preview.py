"""A PNG preview of a volume: the middle axial, coronal and sagittal slices, labelled by direction.

The volume is first turned to the closest canonical (RAS) orientation through its affine, then
shown in the radiological convention (patient's right on the viewer's left, anterior / superior
up), at the physical aspect ratio. A wrong affine shows at a glance: a head upside down, or a
face looking the wrong way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpipe.io import atomic_path

#: longest side of each panel, pixels
PANEL = 256


def _limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0))
    return float(lo), float(hi if hi > lo else lo + 1)


def _window(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _panel(img2d: np.ndarray, spacing: tuple[float, float], scale: float):  # type: ignore[no-untyped-def]
    """``img2d[x, y]`` (x to the viewer's right, y up) -> PIL image, ``scale`` pixels per mm."""
    from PIL import Image

    h_mm, w_mm = img2d.shape[1] * spacing[1], img2d.shape[0] * spacing[0]
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    return Image.fromarray(np.ascontiguousarray(img2d.T[::-1])).resize(size, Image.Resampling.BILINEAR)


def preview_indices(shape: tuple[int, ...], affine: np.ndarray) -> dict[int, int]:
    """``{volume axis: index}`` of the three planes a preview of a volume of ``shape`` shows.

    They are the middle slices along the R, A and S axes of the volume turned to RAS: a writer that
    streams a volume can keep just these three planes (:func:`write_preview_planes`).
    """
    from medpipe.dicom.nifti import io_orientation

    ornt = io_orientation(affine)
    out = {}
    for axis, (_, flip) in enumerate(ornt):
        n = int(shape[axis])
        out[axis] = n // 2 if flip > 0 else n - 1 - n // 2
    return out


def write_preview(data: np.ndarray, affine: np.ndarray, path: Path, title: str = "") -> None:
    """Write a 3-panel PNG preview of ``data`` (3D or 4D: first volume) to ``path`` atomically."""
    vol = data[..., 0] if data.ndim == 4 else data
    # only the three middle slices are copied: a volume may be GBs
    planes = {axis: np.take(vol, index, axis=axis) for axis, index in preview_indices(vol.shape, affine).items()}
    write_preview_planes(planes, vol.shape[:3], affine, path, title)


def _ras_plane(plane: np.ndarray, fixed: int, ornt: np.ndarray) -> np.ndarray:
    """A plane of the volume (volume axis ``fixed`` removed) with its axes turned to RAS order and direction."""
    rest = [a for a in range(3) if a != fixed]
    for k, a in enumerate(rest):
        if ornt[a, 1] < 0:
            plane = np.flip(plane, axis=k)
    return plane if ornt[rest[0], 0] < ornt[rest[1], 0] else plane.T


def write_preview_planes(planes: dict[int, np.ndarray], shape: tuple[int, ...], affine: np.ndarray, path: Path,
                         title: str = "") -> None:
    """The preview of a volume of ``shape`` from its three planes ``{volume axis: plane}`` (:func:`preview_indices`)."""
    from PIL import Image, ImageDraw

    from medpipe.dicom.nifti import io_orientation

    ornt = io_orientation(affine)
    ras_shape = [0, 0, 0]
    for axis, (ras, _) in enumerate(ornt):
        ras_shape[int(ras)] = int(shape[axis])
    by_ras = {int(ornt[a, 0]): _ras_plane(planes[a], a, ornt) for a in range(3)}  # RAS axis fixed -> plane
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))[np.argsort(ornt[:, 0])]
    # radiological display: the patient's right (+R, high x) on the viewer's left, hence the flips
    planes_f32 = [np.asarray(p, dtype=np.float32) for p in (by_ras[2][::-1, :], by_ras[1][::-1, :], by_ras[0][::-1, :])]
    lo, hi = _limits(np.concatenate([p.ravel() for p in planes_f32]))
    axial, coronal, sagittal = (_window(p, lo, hi) for p in planes_f32)
    scale = PANEL / float(max(n * d for n, d in zip(ras_shape, zooms, strict=True)))  # one mm-to-pixel scale
    panels = [
        ("axial", _panel(axial, (zooms[0], zooms[1]), scale), ("R", "L", "A", "P")),
        ("coronal", _panel(coronal, (zooms[0], zooms[2]), scale), ("R", "L", "S", "I")),
        ("sagittal", _panel(sagittal, (zooms[1], zooms[2]), scale), ("A", "P", "S", "I")),
    ]
    pad, top = 6, 18
    width = sum(p.width for _, p, _ in panels) + pad * (len(panels) + 1)
    height = max(p.height for _, p, _ in panels) + top + pad * 2
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), title[:120], fill=255)
    left = pad
    for name, img, (l_lab, r_lab, t_lab, b_lab) in panels:
        canvas.paste(img, (left, top + pad))
        cy = top + pad + img.height // 2
        draw.text((left + 2, cy - 5), l_lab, fill=255)
        draw.text((left + img.width - 9, cy - 5), r_lab, fill=255)
        draw.text((left + img.width // 2 - 3, top + pad + 1), t_lab, fill=255)
        draw.text((left + img.width // 2 - 3, top + pad + img.height - 12), b_lab, fill=255)
        draw.text((left + 2, top + pad + img.height - 12), name, fill=160)
        left += img.width + pad
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
