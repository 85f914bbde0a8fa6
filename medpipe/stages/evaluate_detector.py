"""Stage ``evaluate_detector``: FROC and the LUNA16 competition performance metric on held-out scans.

Every scan of the split (default ``test``) whose findings are known goes through the detector's
sliding-window inference with box NMS (:class:`medpipe.inference.detection.DetectionModel`); the
detections are matched to the nodules as LUNA16 does (a hit: centre distance below the nodule's
radius) and scored by FROC (:mod:`medpipe.metrics.detection`): the sensitivity at 1/8, 1/4, 1/2,
1, 2, 4 and 8 false positives per scan and their mean, the CPM, each with a percentile bootstrap
95 % interval over scans (seeded by the run's seed).

Outputs in the stage folder: ``froc.png`` (the curve, the CPM's points and their intervals),
``nodules.csv`` (one row per nodule: scan, centre, diameter, best score, found at 1 false positive
per scan or not), ``detections.csv`` (every detection: centre, diameter, score, the nodule it hits
or a false positive) and ``summary.json``. Metrics: ``cpm``, ``cpm_ci95``, ``sensitivity``
(rate -> value), ``sensitivity_ci95``, ``n_scans``, ``n_nodules``, ``found_at_1fp``, the threshold
of 1 false positive per scan, and the sensitivity by nodule size (< 6 mm, 6-10 mm, >= 10 mm).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from medpipe.data.datalist import load_datalist
from medpipe.data.detection import finding_items
from medpipe.io import sha256_file, write_csv_atomic, write_text_atomic
from medpipe.metrics.segmentation import format_ci
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage

#: nodule size bands (mm) of the per-size sensitivities: below 6 mm (no follow-up in Fleischner), 6-10, 10 and up
SIZE_BANDS: tuple[tuple[str, float, float], ...] = (("<6mm", 0.0, 6.0), ("6-10mm", 6.0, 10.0),
                                                     (">=10mm", 10.0, math.inf))


class EvaluateDetectorParams(StageParams):
    detector: InputPath | None = Field(None, description="None: the train_detector stage's checkpoint")
    datalist: InputPath | None = Field(None, description="None: the datalist the previous stages used")
    split: Literal["train", "val", "test"] = "test"
    bootstrap: int = Field(1000, ge=0, le=100000, description="bootstrap resamples for the 95 % intervals")


def _ci(v: tuple[float, float]) -> list[float | None]:
    return [None if math.isnan(x) else round(x, 4) for x in v]


@stage("evaluate_detector", EvaluateDetectorParams,
       needs=(Need("detector", params=("detector",)), Need("datalist", params=("datalist",))))
def evaluate_detector(ctx: RunContext, p: EvaluateDetectorParams) -> StageResult:
    from medpipe.inference.detection import DetectionModel
    from medpipe.metrics.detection import froc_with_ci
    from medpipe.report.detection_plots import froc_png
    from medpipe.training.detection import scan_matches

    ckpt = ctx.input("detector", p.detector)
    dl_path = ctx.input("datalist", p.datalist)
    model = DetectionModel.load(ckpt, ctx.device)
    doc = load_datalist(dl_path)
    items = finding_items(doc, p.split, path=dl_path)
    t0 = time.perf_counter()
    transform = model.transform()
    with ctx.progress(f"Detecting on {p.split}", len(items)) as advance:
        matches, found = scan_matches(model, _Images(items, transform), [it["findings"] for it in items], advance)
    seconds = time.perf_counter() - t0
    curve, ci = froc_with_ci(matches, seed=ctx.seed, n=p.bootstrap)
    t1 = curve.threshold_at(1.0)
    nodule_rows, det_rows = [], []
    for it, m, dets in zip(items, matches, found, strict=True):
        scan = it.get("patient_id") or it.get("study_uid")
        for k, f in enumerate(it["findings"]):
            best = float(m.nodule_scores[k])
            nodule_rows.append({"scan": scan, "nodule": f.get("label") or f"Nodule {k + 1}",
                                **{a: round(float(v), 2) for a, v in zip("xyz", f["center_lps"], strict=True)},
                                "diameter_mm": round(float(f["diameter_mm"]), 2),
                                "best_score": round(best, 4) if np.isfinite(best) else None,
                                "found_at_1fp": bool(np.isfinite(best) and best >= t1)})
        for d, hit in zip(dets, m.hits, strict=True):
            det_rows.append({"scan": scan, **{a: round(v, 2) for a, v in zip("xyz", d.center_lps, strict=True)},
                             "diameter_mm": round(d.diameter_mm, 2), "score": round(d.score, 4),
                             "hit": it["findings"][hit].get("label") or f"Nodule {hit + 1}" if hit >= 0 else "",
                             "false_positive": hit < 0})
    by_size = {}
    for name, lo, hi in SIZE_BANDS:
        band = [r for r in nodule_rows if lo <= r["diameter_mm"] < hi]
        by_size[name] = {"n": len(band), "found_at_1fp": sum(r["found_at_1fp"] for r in band)}
    metrics: dict[str, Any] = {
        "cpm": None if math.isnan(curve.cpm) else round(curve.cpm, 4), "cpm_ci95": _ci(ci["cpm"]),
        "sensitivity": {f"{r:g}": round(v, 4) for r, v in curve.at_rates.items()},
        "sensitivity_ci95": {f"{r:g}": _ci(ci[f"sens@{r:g}"]) for r in curve.at_rates},
        "n_scans": curve.n_scans, "n_nodules": curve.n_nodules,
        "found_at_1fp": sum(r["found_at_1fp"] for r in nodule_rows),
        "threshold_at_1fp": None if math.isinf(t1) else round(t1, 4), "by_size": by_size, "split": p.split,
        "detect_seconds": round(seconds, 2),
    }
    write_csv_atomic(ctx.stage_dir / "nodules.csv", nodule_rows,
                     ["scan", "nodule", "x", "y", "z", "diameter_mm", "best_score", "found_at_1fp"])
    write_csv_atomic(ctx.stage_dir / "detections.csv", det_rows,
                     ["scan", "x", "y", "z", "diameter_mm", "score", "hit", "false_positive"])
    write_text_atomic(ctx.stage_dir / "summary.json", json.dumps(
        {**metrics, "detector": str(ckpt), "datalist": str(dl_path)}, indent=1) + "\n")
    froc_png(curve, ctx.stage_dir / "froc.png",
             f"{p.split} split: CPM {curve.cpm:.3f} (95% CI {format_ci(ci['cpm'])}), {curve.n_nodules} nodules in "
             f"{curve.n_scans} scans", ci)
    ctx.log.info("%s split: CPM %s (95%% CI %s) on %d nodules in %d scans; sensitivity %s at 1/8..8 FP/scan; "
                 "%d found at 1 FP/scan; %.1f s", p.split, metrics["cpm"], format_ci(ci["cpm"]), curve.n_nodules,
                 curve.n_scans, list(metrics["sensitivity"].values()), metrics["found_at_1fp"], seconds)
    return StageResult(metrics=metrics, inputs={str(ckpt): sha256_file(ckpt)})


class _Images:
    """The preprocessed images of ``items``, one at a time (a whole split need not fit in memory)."""

    def __init__(self, items: list[dict[str, Any]], transform: Any) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Any:
        from medpipe.data.detection import detection_item

        for it in self.items:
            yield self.transform({"image": detection_item(it)["image"]})["image"]
