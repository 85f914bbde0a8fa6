"""Stage ``sample``: generate the synthetic brain-tumour studies (skipped when already there).

Outputs ``{"sample_dir": <absolute path>}`` for the ``ingest`` stage (and ``labels.csv`` for the
``dataset`` stage's CSV labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from medpipe.stage import OutputPath, RunContext, StageParams, StageResult, stage


class SampleParams(StageParams):
    out: OutputPath = "sample_data/brain_tumor"
    cases: int = Field(default=12, ge=1)
    seed: int | None = Field(default=None, ge=0, description="None: the run's seed")
    tumor_fraction: float = Field(default=0.7, ge=0.0, le=1.0)
    matrix: int = Field(default=128, ge=8)
    pixel_spacing: float = Field(default=1.5, gt=0)
    slices: int = Field(default=32, ge=2)
    slice_thickness: float = Field(default=4.0, gt=0)


@stage("sample", SampleParams, gives=("sample_dir",))
def sample(ctx: RunContext, p: SampleParams) -> StageResult:
    from medpipe.sample import BrainTumorParams, existing_generation, generate_brain_tumor

    out = Path(p.out).expanduser().resolve()
    seed = ctx.seed if p.seed is None else p.seed
    kwargs: dict[str, Any] = {"matrix": p.matrix, "pixel_spacing": p.pixel_spacing, "slices": p.slices,
                              "slice_thickness": p.slice_thickness}
    params = BrainTumorParams(p.cases, seed, p.tumor_fraction, **kwargs)
    generated = existing_generation(out, params) is None
    if generated:
        with ctx.progress("Generating sample studies", p.cases) as advance:
            infos = generate_brain_tumor(out, p.cases, seed, p.tumor_fraction, progress=lambda _: advance(1),
                                         **kwargs)
        ctx.log.info("generated %d synthetic studies in %s", len(infos), out)
    else:
        infos = generate_brain_tumor(out, p.cases, seed, p.tumor_fraction, **kwargs)
        ctx.log.info("%s already holds this sample (%d studies): not regenerated", out, len(infos))
    return StageResult(
        outputs={"sample_dir": str(out)},
        metrics={"sample_cases": len(infos), "sample_with_tumor": sum(i.has_tumor for i in infos)},
    )
