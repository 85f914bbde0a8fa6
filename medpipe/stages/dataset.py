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

**NIfTI datasets** (no DICOM, no ingest): ``source: {format: nnunet | msd | csv, path: ...}`` reads an
nnU-Net v2 raw folder, a Medical Segmentation Decathlon task folder or a CSV of cases
(:mod:`medpipe.data.nifti_datasets`, as ``medpipe import nnunet|msd|csv`` does): channels and label
names come from the dataset (``reference``: the grid channel, default the first; ``label_names``
overrides the declared names), every case is checked (channels on one grid or resampled, and said
so; label values declared) and the cases are split by patient as above. ``ingest_dir``, ``channels``
and ``labels`` select DICOM series and do not apply.

The work is done by :mod:`medpipe.data.channels` and :mod:`medpipe.data.datalist_builder` (which
``predict`` and scoring call directly); this module is the parameters and the wiring.
"""

from __future__ import annotations

import re
from typing import Literal

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
from medpipe.io import sha256_file
from medpipe.stage import InputPath, Need, RunContext, Seed, StageParams, StageResult, stage

__all__ = ["DEFAULT_CHANNELS", "ChannelRule", "CsvLabels", "DatasetParams", "NiftiLabels", "NiftiSource", "SegLabels",
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


class NiftiSource(StageParams):
    """A NIfTI dataset in a layout people already have (see :mod:`medpipe.data.nifti_datasets`)."""

    format: Literal["nnunet", "msd", "csv"] = Field(description="nnunet (v2 raw folder), msd (Decathlon task "
                                                                "folder) or csv (case_id, channels, label)")
    path: InputPath = Field(description="the dataset folder (nnunet, msd) or CSV file (csv)")


class DatasetParams(StageParams):
    source: NiftiSource | None = Field(default=None, description="a NIfTI dataset instead of an ingest folder")
    ingest_dir: InputPath | None = Field(default=None, description="None: the ingest stage's output")
    channels: dict[str, ChannelRule] = Field(default_factory=lambda: dict(DEFAULT_CHANNELS))
    reference: str = Field(default="FLAIR", description="channel whose grid every channel and label is put on")
    labels: LabelSpec | None = Field(default_factory=lambda: SegLabels())
    label_names: dict[int, str] | None = Field(default=None, description="label value -> name; default: SEG segment labels")
    split: SplitParams = Field(default_factory=lambda: SplitParams())

    @model_validator(mode="after")
    def _check(self) -> DatasetParams:
        if self.source is not None:
            dicom_only = sorted({"ingest_dir", "channels", "labels"} & self.model_fields_set)
            if dicom_only:
                raise ValueError(f"source: a NIfTI dataset brings its own channels and labels; remove "
                                 f"{', '.join(dicom_only)} (they select DICOM series of an ingest folder)")
            return self
        if not self.channels:
            raise ValueError("channels: at least one channel is needed")
        bad = [c for c in self.channels if not re.fullmatch(r"[A-Za-z0-9_-]+", c)]
        if bad:
            raise ValueError(f"channel names may use letters, digits, '_' and '-' only: {bad}")
        if self.reference not in self.channels:
            raise ValueError(f"reference {self.reference!r} is not one of the channels {list(self.channels)}")
        return self


@stage("dataset", DatasetParams,
       needs=(Need("ingest_dir", params=("ingest_dir", "source")), Need("sample_dir", optional=True)),
       gives=("datalist",))
def dataset(ctx: RunContext, p: DatasetParams) -> StageResult:
    if p.source is not None:
        return _from_nifti(ctx, p, p.source)
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


def _from_nifti(ctx: RunContext, p: DatasetParams, src: NiftiSource) -> StageResult:
    from pathlib import Path

    from medpipe.data.nifti_datasets import import_nifti_dataset, read_source
    from medpipe.errors import MedpipeError

    path = Path(src.path).expanduser().resolve()
    sp = p.split
    seed = ctx.seed if sp.seed is None else sp.seed
    reference = p.reference if "reference" in p.model_fields_set else None
    try:
        n = len(read_source(src.format, path, label_names=p.label_names).cases)
        with ctx.progress(f"Checking the {src.format} cases", n) as advance:
            result = import_nifti_dataset(src.format, path, ctx.stage_dir, reference=reference,
                                          label_names=p.label_names, val=sp.val, test=sp.test, folds=sp.folds,
                                          fold=sp.fold, seed=seed, stratify=sp.stratify, relative_within=ctx.run_dir,
                                          log=ctx.log, progress=advance)
    except MedpipeError as exc:
        raise StageError(f"source: {exc}", hint=exc.hint) from exc
    for note in result.notes:
        ctx.log.info("%s", note)
    metrics = {"n_train": result.counts["train"], "n_val": result.counts["val"], "n_test": result.counts["test"],
               "n_skipped": len(result.skipped), "n_resampled": len(result.resampled)}
    ctx.log.info("datalist from %s %s: %d train, %d val, %d test cases, %d skipped; channels %s on the %s grid, %d "
                 "volume(s) resampled; labels %s", src.format, path, metrics["n_train"], metrics["n_val"],
                 metrics["n_test"], metrics["n_skipped"], ", ".join(result.channels), result.reference,
                 len(result.resampled), result.label_names)
    declaration = path / "dataset.json" if src.format != "csv" else path
    inputs = {str(declaration): sha256_file(declaration)} if declaration.is_file() else {}
    return StageResult(outputs={"datalist": str(result.datalist)}, metrics=metrics, inputs=inputs)
