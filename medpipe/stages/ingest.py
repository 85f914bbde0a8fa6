"""Stage ``ingest``: :func:`medpipe.ingest.ingest` on a source folder / zip / DICOMDIR.

``source`` defaults to the ``sample_dir`` of an earlier ``sample`` stage; ``out`` defaults to this
stage's own folder in the run directory. Outputs ``{"ingest_dir": <absolute path>}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from medpipe.stage import InputPath, Need, OutputPath, RunContext, StageParams, StageResult, stage


class IngestParams(StageParams):
    source: InputPath | None = Field(default=None, description="folder, zip, DICOMDIR or file; None: the sample stage's output")
    out: OutputPath | None = Field(default=None, description="output folder; None: this stage's folder in the run directory")
    compress: bool = True
    workers: int | None = Field(default=None, ge=1, description="None: one per CPU core (at most 8)")


class _ProgressSink:
    """Adapts the run's progress bars to ingest's ``start(phase, total)`` / ``advance(n)`` protocol."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.stack = contextlib.ExitStack()
        self._advance: Callable[[int], None] = lambda n: None

    def start(self, phase: str, total: int) -> None:
        self.stack.close()
        self._advance = self.stack.enter_context(self.ctx.progress(phase, total))

    def advance(self, n: int = 1) -> None:
        self._advance(n)

    def close(self) -> None:
        self.stack.close()


@stage("ingest", IngestParams, needs=(Need("sample_dir", params=("source",)),), gives=("ingest_dir",))
def ingest(ctx: RunContext, p: IngestParams) -> StageResult:
    from medpipe.ingest import ingest as run_ingest

    source = ctx.input("sample_dir", p.source, "source")
    out = Path(p.out).expanduser().resolve() if p.out is not None else ctx.stage_dir
    sink = _ProgressSink(ctx)
    try:
        report = run_ingest(source, out, workers=p.workers, compress=p.compress, progress=sink)
    finally:
        sink.close()
    n_volumes = sum(1 for v in report.volumes if v["volume"] and v["status"] != "rejected")
    ctx.log.info("ingested %s: %d files, %d volumes, %d files not used (see %s)", source, report.n_files,
                 n_volumes, len(report.rejected), out / "rejected.csv")
    return StageResult(
        outputs={"ingest_dir": str(out)},
        metrics={"n_files": report.n_files, "n_volumes": n_volumes, "n_rejected": len(report.rejected)},
    )
