"""Stage ``evaluate``: score a trained segmenter on held-out studies, on their source grid.

The checkpoint is loaded once; every study of the split (default ``test``) goes through the eval
transforms stored in the checkpoint, sliding-window inference (optionally with flip test-time
augmentation), and back onto the reference volume's grid, where it is compared with the label map
as the dataset stage wrote it (never resampled). Per case and per class: Dice and HD95 (mm) with
``monai.metrics``; for multiclass models also the whole tumour (every class > 0).

Outputs in the stage folder: ``cases.csv`` (one row per case), ``overlays/*.png`` (image, ground
truth contour in green, prediction contour in red, on the slice with most tumour) and
``summary.json``. Metrics::

    dice            mean whole-tumour Dice over the cases whose ground truth has tumour
    dice_ci95       its bootstrap 95 % confidence interval (cases resampled, seeded by the run's seed)
    hd95, hd95_ci95 the same for HD95 in mm (cases where truth and prediction are both non-empty)
    dice_all_cases  mean Dice over every case, an empty prediction on an empty truth counting as 1
    false_positive_cases  tumour-free cases with any voxel predicted as tumour
    per_label       {class name: {dice, dice_ci95, hd95, n}}

Tumour-free cases are left out of ``dice`` because their Dice is undefined (0/0): counting them as 1
would reward a model for the easy cases; their errors show in ``false_positive_cases``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from medpipe.data.datalist import case_name, load_datalist, split_items
from medpipe.data.labels import map_labels
from medpipe.data.transforms import TransformList
from medpipe.errors import StageError
from medpipe.inference.checkpoint import load_segmenter
from medpipe.inference.segmentation import grid_of, segment_item
from medpipe.io import atomic_path, sha256_file, write_text_atomic
from medpipe.metrics.bootstrap import bootstrap_ci
from medpipe.stage import Need, RunContext, StageParams, StageResult, stage


class EvaluateParams(StageParams):
    checkpoint: str | None = Field(None, description="None: the train_segmenter stage's checkpoint")
    datalist: str | None = Field(None, description="None: the dataset stage's datalist")
    split: Literal["train", "val", "test"] = "test"
    eval_transforms: TransformList | None = Field(None, description="None: those stored in the checkpoint")
    tta: bool = Field(False, description="average over flips along each axis (test-time augmentation)")
    hd95: bool = True
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for the 95 % confidence intervals")
    overlays: int = Field(4, ge=0, description="how many cases get a PNG overlay")
    overlay_channel: str | None = Field(None, description="channel shown in overlays; None: the reference channel")


# -- metrics ------------------------------------------------------------------------------------------


def dice_hd95(pred: np.ndarray, truth: np.ndarray, classes: list[int], spacing: Any, hd95: bool = True
              ) -> dict[int, tuple[float, float]]:
    """``{class: (Dice, HD95 mm)}`` of two class maps on one grid (MONAI metrics).

    Dice is NaN when the truth lacks the class (undefined, or 0 for any false positive: such cases are
    counted separately); HD95 is NaN unless both have it.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    out: dict[int, tuple[float, float]] = {}
    for c in classes:
        p = torch.from_numpy(pred == c)[None, None]
        t = torch.from_numpy(truth == c)[None, None]
        yp = torch.cat([~p, p], 1).float()
        yt = torch.cat([~t, t], 1).float()
        if not bool(t.any()):
            d = math.nan
        else:
            d = float(compute_dice(yp, yt, include_background=False, ignore_empty=True).reshape(-1)[0])
        h = math.nan
        if hd95 and bool(t.any()) and bool(p.any()):
            h = float(compute_hausdorff_distance(yp, yt, include_background=False, percentile=95,
                                                 spacing=[float(s) for s in spacing]).reshape(-1)[0])
        out[c] = (d, h)
    return out


def _voxels(path: str | Path) -> np.ndarray:
    import nibabel as nib

    img: Any = nib.load(str(path))
    return np.asarray(img.dataobj)


def _mean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def _r(x: float, nd: int = 6) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else round(float(x), nd)


# -- overlays -----------------------------------------------------------------------------------------


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
            if view(t).any():
                ax.contour(view(t).astype(float), levels=[0.5], colors="lime", linewidths=1.2)
            if view(p).any():
                ax.contour(view(p).astype(float), levels=[0.5], colors="red", linewidths=1.2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, va="center")
        ax.text(0.96, 0.5, "L", color="yellow", transform=ax.transAxes, va="center")
    axes[1].set_title("truth (green), prediction (red)", fontsize=9)
    axes[0].set_title(f"axial slice {k}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return k


def nib_axes(affine: np.ndarray) -> np.ndarray:
    """For each RAS axis, the array axis that runs along it."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    order = np.empty(3, dtype=int)
    for array_axis, (ras_axis, _) in enumerate(ornt):
        order[int(ras_axis)] = array_axis
    return order


# -- the stage ----------------------------------------------------------------------------------------


@stage("evaluate", EvaluateParams, needs=(Need("checkpoint", params=("checkpoint",)), Need("datalist", params=("datalist",))),
       gives=("evaluation",))
def evaluate(ctx: RunContext, p: EvaluateParams) -> StageResult:
    from medpipe.data.datasets import make_dataset

    ckpt_path = ctx.input("checkpoint", p.checkpoint)
    dl_path = ctx.input("datalist", p.datalist)
    net, ck = load_segmenter(ckpt_path, ctx.device)
    doc = load_datalist(dl_path)
    items = split_items(doc, p.split, need_labels=True, path=dl_path)
    channels = list(doc.get("channels") or [])
    if ck.get("channels") and channels and list(ck["channels"]) != channels:
        raise StageError(f"the checkpoint was trained on channels {ck['channels']}, the datalist has {channels}")
    info = ck["labels"]
    class_names = {int(k): v for k, v in info["classes"].items()}
    spec = p.eval_transforms if p.eval_transforms is not None else ck["eval_transforms"]
    roi = tuple(ck["roi_size"])
    ds = make_dataset(items, spec, "none")
    ref_name = p.overlay_channel or doc.get("reference") or (channels[-1] if channels else None)
    show = channels.index(ref_name) if ref_name in channels else len(channels) - 1 if channels else 0
    if p.overlay_channel and p.overlay_channel not in channels:
        raise StageError(f"overlay_channel {p.overlay_channel!r} is not one of the channels {channels}")

    rows: list[dict[str, Any]] = []
    per_class: dict[int, list[tuple[float, float]]] = {c: [] for c in class_names}
    whole: list[tuple[float, float, bool, bool]] = []  # dice, hd95, truth has tumour, prediction has tumour
    overlays_dir = ctx.stage_dir / "overlays"
    t0 = time.perf_counter()
    multiclass = len(class_names) > 1
    with ctx.progress(f"Evaluating on {p.split}", len(items)) as advance:
        for i, item in enumerate(items):
            try:
                data = ds[i]
                truth_raw = _voxels(item["label"])
            except Exception as exc:
                raise StageError(f"case {item.get('patient_id')}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
            grid = grid_of(item["label"])
            pred, _ = segment_item(net, data, grid, roi, device=ctx.device, amp=ctx.amp, tta=p.tta,
                                   sw_batch_size=int(ck.get("sw_batch_size", 4)), overlap=float(ck.get("overlap", 0.25)))
            truth = map_labels(truth_raw, info).astype(np.uint8)
            spacing = grid.spacing
            scores = dice_hd95(pred, truth, sorted(class_names), spacing, p.hd95)
            wt = dice_hd95((pred > 0).astype(np.uint8), (truth > 0).astype(np.uint8), [1], spacing, p.hd95)[1] \
                if multiclass else scores[1]
            has_t, has_p = bool(truth.any()), bool(pred.any())
            whole.append((wt[0], wt[1], has_t, has_p))
            voxel_ml = float(np.prod(spacing)) / 1000.0
            row: dict[str, Any] = {
                "patient_id": item.get("patient_id"), "study_uid": item.get("study_uid"),
                "has_tumour": int(has_t), "dice_whole_tumour": _r(wt[0]), "hd95_whole_tumour": _r(wt[1], 3),
                "truth_ml": round(float((truth > 0).sum()) * voxel_ml, 3),
                "pred_ml": round(float((pred > 0).sum()) * voxel_ml, 3),
            }
            if multiclass:
                for c, (d, h) in scores.items():
                    key = class_names[c].replace(" ", "_")
                    row[f"dice_{key}"] = _r(d)
                    row[f"hd95_{key}"] = _r(h, 3)
            for c, v in scores.items():
                per_class[c].append(v)
            rows.append(row)
            if i < p.overlays:
                image = _voxels(item["image"][show] if isinstance(item["image"], list) else item["image"])
                image = image.astype(np.float32, copy=False)
                if image.ndim == 4:
                    image = image[..., 0]
                dtxt = "n/a (no tumour)" if math.isnan(wt[0]) else f"{wt[0]:.3f}"
                overlay_png(image, truth, pred, grid.affine, overlays_dir / f"{case_name(item)}.png",
                            f"{item.get('patient_id')}  {ref_name or ''}  whole-tumour Dice {dtxt}")
            ctx.log.info("%s: whole-tumour Dice %s, HD95 %s mm (truth %.1f mL, predicted %.1f mL)",
                         item.get("patient_id"), row["dice_whole_tumour"], row["hd95_whole_tumour"],
                         row["truth_ml"], row["pred_ml"])
            advance(1)
    seconds = time.perf_counter() - t0

    tumour = [w for w in whole if w[2]]
    dice_vals = [w[0] for w in tumour]
    hd_vals = [w[1] for w in tumour if not math.isnan(w[1])]
    free = [w for w in whole if not w[2]]
    dice_all = [w[0] if w[2] else (1.0 if not w[3] else 0.0) for w in whole]
    metrics: dict[str, Any] = {
        "dice": _r(_mean(dice_vals)),
        "dice_ci95": [_r(x) for x in bootstrap_ci(dice_vals, seed=ctx.seed, n=p.bootstrap)],
        "hd95": _r(_mean(hd_vals), 3),
        "hd95_ci95": [_r(x, 3) for x in bootstrap_ci(hd_vals, seed=ctx.seed, n=p.bootstrap)],
        "dice_all_cases": _r(_mean(dice_all)),
        "n_cases": len(whole), "n_with_tumour": len(tumour),
        "false_positive_cases": sum(1 for w in free if w[3]),
        "missed_tumours": sum(1 for w in tumour if not w[3]),
        "tta": p.tta, "split": p.split,
    }
    per_label: dict[str, Any] = {}
    for c, vals in per_class.items():
        dices = [v[0] for v in vals if not math.isnan(v[0])]  # cases whose truth has the class
        hds = [v[1] for v in vals if not math.isnan(v[1])]
        per_label[class_names[c]] = {"dice": _r(_mean(dices)),
                                     "dice_ci95": [_r(x) for x in bootstrap_ci(dices, seed=ctx.seed, n=p.bootstrap)],
                                     "hd95": _r(_mean(hds), 3), "n": len(dices)}
    metrics["per_label"] = per_label
    if not tumour:
        ctx.log.warning("no case of the %s split has tumour in its ground truth: dice is undefined", p.split)

    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["patient_id"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(ctx.stage_dir / "cases.csv", buf.getvalue())
    write_text_atomic(ctx.stage_dir / "summary.json", json.dumps({**metrics, "checkpoint": str(ckpt_path),
                                                                  "datalist": str(dl_path)}, indent=1) + "\n")
    ctx.log.info("%s split: whole-tumour Dice %s (95%% CI %s) on %d cases with tumour; HD95 %s mm; %d false "
                 "positive(s) on %d tumour-free cases; %.1f s", p.split, metrics["dice"],
                 metrics["dice_ci95"], len(tumour), metrics["hd95"], metrics["false_positive_cases"], len(free),
                 seconds)
    return StageResult(metrics=metrics, outputs={"evaluation": str(ctx.stage_dir / "cases.csv")},
                       inputs={str(ckpt_path): sha256_file(ckpt_path)})
