"""Synthetic NIfTI segmentation datasets in the nnU-Net v2, Decathlon and CSV layouts (for the import tests).

Each case: a head-like ellipsoid with a two-label lesion (1 = edema shell, 2 = core), two channels
(FLAIR: bright edema and core; T1c: bright core), seeded. A few cases are lesion-free.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (24, 24, 16)
SPACING = (2.0, 2.0, 3.0)
CHANNELS = ["FLAIR", "T1c"]
LABELS = {0: "background", 1: "edema", 2: "core"}


def affine(spacing: tuple[float, float, float] = SPACING, origin: tuple[float, float, float] = (-24.0, -24.0, -24.0)
           ) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def make_case(seed: int, lesion: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({channel: float32 volume}, uint8 label map)`` on :data:`SHAPE`."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    head = ((x - 11.5) / 10) ** 2 + ((y - 11.5) / 10) ** 2 + ((z - 7.5) / 7) ** 2 <= 1.0
    label = np.zeros(SHAPE, np.uint8)
    if lesion:
        c = rng.uniform([8, 8, 5], [15, 15, 10])
        r = rng.uniform(3.0, 4.5)
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * SPACING[2] / SPACING[0]) ** 2)
        label[(d <= r) & head] = 1
        label[(d <= r * 0.5) & head] = 2
    flair = np.where(head, 100.0, 0.0) + 80.0 * (label > 0) + rng.normal(0, 5, SHAPE)
    t1c = np.where(head, 90.0, 0.0) + 120.0 * (label == 2) + rng.normal(0, 5, SHAPE)
    return {"FLAIR": flair.astype(np.float32), "T1c": t1c.astype(np.float32)}, label


def _save(data: np.ndarray, path: Path, aff: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), str(path))


def lesion_plan(n: int) -> list[bool]:
    """Which of ``n`` cases have a lesion: all but every fourth."""
    return [i % 4 != 3 for i in range(n)]


def make_nnunet(root: Path, n: int = 8, seed: int = 0) -> Path:
    """``root/Dataset001_Synth`` in the nnU-Net v2 raw layout."""
    ds = root / "Dataset001_Synth"
    for i, lesion in enumerate(lesion_plan(n)):
        case = f"synth_{i:03d}"
        images, label = make_case(seed + i, lesion)
        for c, name in enumerate(CHANNELS):
            _save(images[name], ds / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        _save(label, ds / "labelsTr" / f"{case}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(CHANNELS)},
        "labels": {v: k for k, v in LABELS.items()}, "numTraining": n, "file_ending": ".nii.gz",
        "name": "Synth"}, indent=1))
    return ds


def make_msd(root: Path, n: int = 8, seed: int = 100) -> Path:
    """``root/Task01_Synth`` in the Decathlon layout (4D multi-channel images)."""
    ds = root / "Task01_Synth"
    training = []
    for i, lesion in enumerate(lesion_plan(n)):
        case = f"synth_{i:03d}"
        images, label = make_case(seed + i, lesion)
        _save(np.stack([images[c] for c in CHANNELS], axis=-1), ds / "imagesTr" / f"{case}.nii.gz")
        _save(label, ds / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (ds / "imagesTr" / "._synth_000.nii.gz").write_bytes(b"AppleDouble")  # as the MSD tar files have
    (ds / "dataset.json").write_text(json.dumps({
        "name": "Synth", "modality": {str(i): n for i, n in enumerate(CHANNELS)},
        "labels": {str(k): v for k, v in LABELS.items()}, "numTraining": n, "training": training,
        "test": []}, indent=1))
    return ds


def make_csv(root: Path, n: int = 8, seed: int = 200, coarse_t1c: bool = True) -> Path:
    """``root/cases.csv`` with relative paths; two cases per patient; T1c on a coarser grid (resampled on import)."""
    folder = root / "csv_data"
    rows = []
    for i, lesion in enumerate(lesion_plan(n)):
        case = f"c{i:02d}"
        images, label = make_case(seed + i, lesion)
        _save(images["FLAIR"], folder / f"{case}_flair.nii.gz")
        if coarse_t1c:  # every other voxel in-plane: the same field of view on a 2x coarser grid
            aff = affine((SPACING[0] * 2, SPACING[1] * 2, SPACING[2]),
                         (-24.0 + SPACING[0] / 2, -24.0 + SPACING[1] / 2, -24.0))
            t1c = images["T1c"].reshape(12, 2, 12, 2, SHAPE[2]).mean(axis=(1, 3))
            _save(t1c.astype(np.float32), folder / f"{case}_t1c.nii.gz", aff)
        else:
            _save(images["T1c"], folder / f"{case}_t1c.nii.gz")
        _save(label, folder / f"{case}_seg.nii.gz")
        rows.append({"case_id": case, "patient_id": f"P{i // 2}", "FLAIR": f"csv_data/{case}_flair.nii.gz",
                     "T1c": f"csv_data/{case}_t1c.nii.gz", "label": f"csv_data/{case}_seg.nii.gz"})
    path = root / "cases.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["case_id", "patient_id", "FLAIR", "T1c", "label"])
        w.writeheader()
        w.writerows(rows)
    return path
