"""Stage ``score``: score a DICOM export with a model package, as ``medpipe score`` does.

A pipeline can end by scoring a fresh export with the model it just trained: ``model`` defaults to
the package of the training stage before it; ``source`` is a DICOM folder / zip / DICOMDIR or an
ingest folder. Outputs (DICOM SEG / SR, optional maps, ``scores.csv``) go to the stage folder (see
:mod:`medpipe.scoring.engine`). A study that fails or lacks a channel is recorded, never fatal; the
stage fails only when no study could be scored at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from medpipe.errors import StageError
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage


class ScoreParams(StageParams):
    source: InputPath = Field(description="DICOM folder / zip / DICOMDIR to score, or an ingest output folder")
    model: InputPath | None = Field(None, description="model package folder; None: the training stage's")
    explain: bool = Field(False, description="also a saliency / probability map as Parametric Map + RGB SC")
    nifti: bool = Field(False, description="also the mask as NIfTI on the ingest grid")
    seg_type: Literal["binary", "labelmap"] = "binary"
    tta: bool | None = Field(None, description="flip test-time augmentation; None: the model's setting")
    readers: int = Field(1, ge=1, le=16)
    writers: int = Field(1, ge=1, le=16)


@stage("score", ScoreParams, needs=(Need("model", params=("model",)),), gives=("scores",))
def score_stage(ctx: RunContext, p: ScoreParams) -> StageResult:
    from medpipe.scoring.engine import ScoreOptions, score

    model = ctx.input("model", p.model)
    source = Path(p.source).expanduser().resolve()
    if not source.exists():
        raise StageError(f"source: {source} does not exist")
    options = ScoreOptions(device=ctx.device, tta=p.tta, explain=p.explain, nifti=p.nifti, seg_type=p.seg_type,
                           readers=p.readers, writers=p.writers)
    report = score(source, model, ctx.stage_dir, options, progress=ctx.progress)
    counts = report.counts
    for row in report.rows:
        if row["status"] != "ok":
            ctx.log.warning("study %s of %s %s: %s", row["study_uid"], row["patient_id"], row["status"], row["reason"])
    if not counts.get("ok"):
        raise StageError(f"no study of {source} could be scored ({counts.get('skipped', 0)} skipped, "
                         f"{counts.get('failed', 0)} failed); see {report.out / 'scores.csv'}")
    secs = report.seconds
    metrics = {"scored": counts.get("ok", 0), "score_skipped": counts.get("skipped", 0),
               "score_failed": counts.get("failed", 0), "score_seconds": round(secs["wall"], 2)}
    ctx.log.info("scored %d studies (%d skipped, %d failed) in %.1f s with model %s", metrics["scored"],
                 metrics["score_skipped"], metrics["score_failed"], secs["wall"], report.model_id[:16])
    return StageResult(outputs={"scores": str(report.out / "scores.csv")}, metrics=metrics)

