"""Stage ``medmnist``: import a MedMNIST ``.npz`` (official split) and hand its datalist on.

The same import as ``medpipe import medmnist FILE --out DIR`` (:mod:`medpipe.data.medmnist`);
``out`` defaults to this stage's folder. Outputs ``{"datalist": ...}`` for the classifier stages.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from medpipe.stage import InputPath, OutputPath, RunContext, StageParams, StageResult, stage


class MedmnistParams(StageParams):
    path: InputPath = Field(description="the MedMNIST .npz file (relative paths: from the current folder)")
    out: OutputPath | None = Field(None, description="where the images go; None: this stage's folder")
    name: str | None = Field(None, description="dataset name; None: from the file name")


@stage("medmnist", MedmnistParams, gives=("datalist",))
def medmnist(ctx: RunContext, p: MedmnistParams) -> StageResult:
    from medpipe.data.medmnist import import_medmnist

    out = Path(p.out).expanduser().resolve() if p.out else ctx.stage_dir / "data"
    s = import_medmnist(p.path, out, name=p.name)
    ctx.log.info("%s: %s %s", s.name, "imported" if s.written else "already imported in", s.out)
    metrics = {f"n_{k}": v for k, v in s.counts.items()}
    return StageResult(outputs={"datalist": str(s.datalist)}, metrics=metrics,
                       inputs={str(Path(p.path).expanduser().resolve()): s.sha256})
