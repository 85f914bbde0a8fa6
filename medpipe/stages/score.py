"""Stage ``score``: score a DICOM export with a model package, as ``medpipe score`` does.

A pipeline can end by scoring a fresh export with the model it just trained: ``model`` defaults to
the package of the training stage before it; ``source`` is a DICOM folder / zip / DICOMDIR, an
ingest folder, or a PACS query ``pacs://NODE?StudyDate=...&Modality=MR`` (as ``medpipe score`` takes
it: the matching studies are pulled into ``<stage folder>/pacs/NODE`` first, resumably, with the node
file ``pacs`` or the default one). Outputs (DICOM SEG / SR, optional maps, ``scores.csv``) go to the
stage folder (see :mod:`medpipe.scoring.engine`). A study that fails or lacks a channel is recorded,
never fatal; the stage fails only when no study could be scored at all.

Each run pulls into its own stage folder (a run folder is self-contained); an interrupted pull
resumes with ``medpipe run --resume``. ``--resume`` also skips a finished stage whose parameters are
unchanged, whatever the PACS holds by then (as for a folder whose contents changed): a new run sees
new studies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from medpipe.errors import ConfigError, StageError
from medpipe.pacs.query import is_pacs_url, parse_pacs_url
from medpipe.stage import InputPath, InputSource, Need, RunContext, StageParams, StageResult, stage


class ScoreParams(StageParams):
    source: InputSource = Field(description="DICOM folder / zip / DICOMDIR to score, an ingest output folder, or a "
                                            "PACS query pacs://NODE?StudyDate=...&Modality=MR (pulled first)")
    pacs: InputPath | None = Field(None, description="PACS node file for a pacs:// source; None: $MEDPIPE_PACS or "
                                                     "the user's config folder")
    model: InputPath | None = Field(None, description="model package folder; None: the training stage's")
    explain: bool = Field(False, description="also a saliency / probability map as Parametric Map + RGB SC")
    nifti: bool = Field(False, description="also the mask as NIfTI on the ingest grid")
    seg_type: Literal["binary", "labelmap"] = "binary"
    tta: bool | None = Field(None, description="flip test-time augmentation; None: the model's setting")
    readers: int = Field(1, ge=1, le=16)
    writers: int = Field(1, ge=1, le=16)

    @field_validator("source")
    @classmethod
    def _query(cls, v: str) -> str:
        if is_pacs_url(v):
            try:
                parse_pacs_url(v)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v


@stage("score", ScoreParams, needs=(Need("model", params=("model",)),), gives=("scores",))
def score_stage(ctx: RunContext, p: ScoreParams) -> StageResult:
    from medpipe.scoring.engine import ScoreOptions, score

    model = ctx.input("model", p.model)
    pulled: dict[str, Any] = {}
    if is_pacs_url(p.source):
        source, pulled = _pull(ctx, p.source, p.pacs)
    else:
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
               "score_failed": counts.get("failed", 0), "score_seconds": round(secs["wall"], 2), **pulled}
    ctx.log.info("scored %d studies (%d skipped, %d failed) in %.1f s with model %s", metrics["scored"],
                 metrics["score_skipped"], metrics["score_failed"], secs["wall"], report.model_id[:16])
    return StageResult(outputs={"scores": str(report.out / "scores.csv")}, metrics=metrics)



def _pull(ctx: RunContext, url: str, nodes_file: str | None) -> tuple[Path, dict[str, Any]]:
    """Pull the studies of a ``pacs://`` source into ``<stage folder>/pacs/NODE``; the folder and pull metrics."""
    from medpipe.pacs.source import pull_source

    with contextlib.ExitStack() as bars:
        advance: list[Callable[[int], None]] = []

        def listed(expected: int, todo: int) -> None:
            advance.append(bars.enter_context(ctx.progress("pulling from the PACS", todo)))

        folder, report = pull_source(url, ctx.stage_dir / "pacs", nodes_file, on_listed=listed,
                                     on_instance=lambda path: advance[0](1) if advance else None)
    for w in report.warnings:
        ctx.log.warning("%s", w)
    ctx.log.info("%s: %d stud%s, %d instances: %d already here, %d pulled in %.1f s -> %s", url,
                 len(report.studies), "y" if len(report.studies) == 1 else "ies", report.expected, report.already,
                 report.received, report.seconds.get("total", 0.0), folder)
    return folder, {"pacs_studies": len(report.studies), "pacs_instances": report.expected,
                    "pacs_pulled": report.received}
