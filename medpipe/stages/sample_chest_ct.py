"""Stage ``sample_chest_ct``: generate the synthetic chest CT studies (skipped when already there).

Phantoms, not patients (:mod:`medpipe.sample.chest_ct`): CT series as DICOM, the organs as a DICOM
SEG, the lung nodules as a DICOM SR (TID 1500, a point and a diameter per nodule) and as
``nodules.csv``. Outputs ``{"sample_dir": <absolute path>}`` for the ``ingest`` stage.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from medpipe.stage import OutputPath, RunContext, Seed, StageParams, StageResult, stage


class SampleChestCtParams(StageParams):
    out: OutputPath = "sample_data/chest_ct"
    cases: int = Field(default=16, ge=1, le=10_000)
    seed: Seed | None = Field(default=None, description="None: the run's seed")
    matrix: int = Field(default=160, ge=16, le=1024, description="rows and columns of every slice")
    min_thickness: float = Field(default=1.25, ge=0.5, le=10.0, description="thinnest slices (mm)")
    max_thickness: float = Field(default=3.0, ge=0.5, le=10.0, description="thickest slices (mm)")
    nodule_free_fraction: float = Field(default=0.2, ge=0.0, le=1.0, description="studies without nodules")
    max_nodules: int = Field(default=6, ge=0, le=6, description="nodules per study: 1 to this many")
    workers: int = Field(default=1, ge=1, le=64, description="processes generating studies at once")

    @model_validator(mode="after")
    def _check(self) -> SampleChestCtParams:
        if self.min_thickness > self.max_thickness:
            raise ValueError(f"min_thickness ({self.min_thickness}) is above max_thickness ({self.max_thickness})")
        return self


@stage("sample_chest_ct", SampleChestCtParams, gives=("sample_dir",))
def sample_chest_ct(ctx: RunContext, p: SampleChestCtParams) -> StageResult:
    from medpipe.sample.chest_ct import ChestCtParams, existing_generation, generate_chest_ct

    out = Path(p.out).expanduser().resolve()
    seed = ctx.seed if p.seed is None else p.seed
    options = {"matrix": p.matrix, "min_thickness": p.min_thickness, "max_thickness": p.max_thickness,
               "nodule_free_fraction": p.nodule_free_fraction, "max_nodules": p.max_nodules}
    if existing_generation(out, ChestCtParams(p.cases, seed, **options)) is None:
        with ctx.progress("Generating chest CT studies", p.cases) as advance:
            infos = generate_chest_ct(out, p.cases, seed, workers=p.workers, progress=lambda _: advance(1), **options)
        ctx.log.info("generated %d synthetic chest CT studies in %s", len(infos), out)
    else:
        infos = generate_chest_ct(out, p.cases, seed, **options)
        ctx.log.info("%s already holds this sample (%d studies): not regenerated", out, len(infos))
    return StageResult(outputs={"sample_dir": str(out)},
                       metrics={"sample_cases": len(infos), "sample_nodules": sum(len(i.nodules) for i in infos),
                                "sample_with_nodules": sum(bool(i.nodules) for i in infos)})
