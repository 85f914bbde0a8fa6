"""Stage ``dataset``: the datalist (``datalist.json``) from an ingest catalog.

Per study (``StudyInstanceUID``), each input **channel** is the one ingested volume (status ``ok`` or
``warning``, 3D) that matches its rule on DICOM attributes, in the spirit of MONAI Deploy's series
selection rules::

    channels:
      T1:    {modality: MR, series_description: "(?i)^t1$"}
      T1c:   {modality: MR, series_description: "(?i)^t1c$|post|gd"}
      T2:    {modality: MR, series_description: "(?i)^t2$"}
      FLAIR: {modality: MR, series_description: "(?i)flair", min_slices: 20}
    reference: FLAIR

A rule may use ``modality`` (exact, case-insensitive), ``series_description``, ``protocol_name`` and
``image_type`` (regular expressions, ``re.search``; ``image_type`` is matched against the values
joined with ``\\``, e.g. ``ORIGINAL\\PRIMARY\\OTHER``) and ``min_slices``. A study where a channel
matches no volume or several, or one volume matches several channels, is skipped with the reason
(logged, listed under ``skipped`` in the datalist and counted in ``n_skipped``).

Every channel ends up on the **reference** channel's grid: volumes whose shape or affine differ are
resampled in world space (trilinear) into this stage's folder; those already on it are used as they
are (no copy). Volumes in different frames of reference are never resampled onto each other.

**Labels** (one source): ``{source: seg}`` the DICOM SEG of the catalog's ``objects`` table that
references the reference series, converted to an integer label map on the reference grid (segment
number -> label value, or ``segments: {number: value}``); ``{source: nifti, pattern: ...}`` a label
map per study (``{patient_id}``, ``{study_uid}``, ``{series_uid}`` in the pattern; resampled with
nearest neighbour when it is on another grid); ``{source: csv, path, column}`` a class per study
(``class`` in the items); or ``labels: null``.

**Split** by patient (a patient's studies never end up in two splits), stratified by class / by
"has a non-empty label map", deterministic from ``split.seed`` (default: the run's seed); with
``split.folds: k`` and ``split.fold: i`` the patients outside the test split are divided into k
folds and fold i is the validation split.

The work is done by :mod:`medpipe.data.channels` and :mod:`medpipe.data.datalist_builder` (which
``predict`` and scoring call directly); this module is the parameters and the wiring.
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from medpipe.data.channels import DEFAULT_CHANNELS, ChannelRule
from medpipe.data.datalist_builder import (
    CsvLabels,
    LabelSpec,
    NiftiLabels,
    SegLabels,
    build_items,
    datalist_document,
    write_datalist,
)
from medpipe.errors import StageError
from medpipe.stage import InputPath, Need, RunContext, Seed, StageParams, StageResult, stage

__all__ = ["DEFAULT_CHANNELS", "ChannelRule", "CsvLabels", "DatasetParams", "NiftiLabels", "SegLabels",
           "SplitParams", "dataset"]


class SplitParams(StageParams):
    val: float = Field(default=0.2, ge=0.0, lt=1.0)
    test: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: Seed | None = Field(default=None, description="None: the run's seed")
    stratify: bool = Field(default=True, description="keep class / empty-label proportions in every split")
    folds: int | None = Field(default=None, ge=2, description="k-fold over the non-test patients (val is then ignored)")
    fold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SplitParams:
        if self.folds is None and self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be below 1 (got {self.val} + {self.test})")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold must be between 0 and folds - 1 = {self.folds - 1}, got {self.fold}")
        return self


class DatasetParams(StageParams):
    ingest_dir: InputPath | None = Field(default=None, description="None: the ingest stage's output")
    channels: dict[str, ChannelRule] = Field(default_factory=lambda: dict(DEFAULT_CHANNELS))
    reference: str = Field(default="FLAIR", description="channel whose grid every channel and label is put on")
    labels: LabelSpec | None = Field(default_factory=lambda: SegLabels())
    label_names: dict[int, str] | None = Field(default=None, description="label value -> name; default: SEG segment labels")
    split: SplitParams = Field(default_factory=lambda: SplitParams())

    @model_validator(mode="after")
    def _check(self) -> DatasetParams:
        if not self.channels:
            raise ValueError("channels: at least one channel is needed")
        bad = [c for c in self.channels if not re.fullmatch(r"[A-Za-z0-9_-]+", c)]
        if bad:
            raise ValueError(f"channel names may use letters, digits, '_' and '-' only: {bad}")
        if self.reference not in self.channels:
            raise ValueError(f"reference {self.reference!r} is not one of the channels {list(self.channels)}")
        return self


@stage("dataset", DatasetParams, needs=(Need("ingest_dir", params=("ingest_dir",)), Need("sample_dir", optional=True)),
       gives=("datalist",))
def dataset(ctx: RunContext, p: DatasetParams) -> StageResult:
    ingest_dir = ctx.input("ingest_dir", p.ingest_dir)
    labels = p.labels
    if isinstance(labels, CsvLabels) and labels.path is None:
        sample_csv = ctx.input("sample_dir", None, "labels.path") / "labels.csv"
        labels = labels.model_copy(update={"path": str(sample_csv)})
    result = build_items(ingest_dir, p.channels, p.reference, labels, work_dir=ctx.stage_dir, log=ctx.log,
                         progress=ctx.progress)
    if not result.items:
        raise StageError(result.why_empty(ingest_dir))
    sp = p.split
    seed = ctx.seed if sp.seed is None else sp.seed
    doc = datalist_document(
        result, channels=list(p.channels), reference=p.reference, ingest_dir=ingest_dir, seed=seed,
        **sp.model_dump(exclude={"seed"}), label_names=p.label_names,
        class_names=labels.class_names if isinstance(labels, CsvLabels) else None, rules=p.channels)
    path = ctx.stage_dir / "datalist.json"
    write_datalist(path, doc, relative_within=ctx.run_dir)
    metrics = {"n_train": len(doc["train"]), "n_val": len(doc["val"]), "n_test": len(doc["test"]),
               "n_skipped": len(result.skipped)}
    ctx.log.info("datalist: %d train, %d val, %d test studies (%d patients), %d skipped; %d channel volumes "
                 "resampled; labels placed by %s", metrics["n_train"], metrics["n_val"], metrics["n_test"],
                 len(result.strata()), len(result.skipped), result.n_resampled, result.label_methods or "-")
    return StageResult(outputs={"datalist": str(path)}, metrics=metrics, inputs=result.inputs)
