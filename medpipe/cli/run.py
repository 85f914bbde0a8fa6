"""``medpipe run FILE`` and ``medpipe validate FILE``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def validate_command(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a value: key.path=value (repeatable)."),
) -> None:
    """Check a pipeline file completely (stages, parameters, MONAI transforms) without running it."""
    from medpipe.config import load_pipeline

    pipeline = load_pipeline(file, set_)
    kinds = ", ".join(s.kind for s in pipeline.stages)
    Console().print(f"[green]ok[/] {file}: {pipeline.config.name}, {len(pipeline.stages)} stages ({kinds})")


def run_command(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<pipeline name>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value: key.path=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run: skip stages whose inputs and parameters are unchanged."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda (default: the pipeline's device)."),
) -> None:
    """Validate, then run a pipeline; results, checkpoints and metrics go to the run directory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medpipe.config import load_pipeline
    from medpipe.errors import ConfigError
    from medpipe.runner import run_pipeline

    if device not in (None, "auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device}: expected auto, cpu or cuda")
    pipeline = load_pipeline(file, set_)
    run_dir = out or Path("runs") / pipeline.config.name
    console = Console()
    progress = Progress(TextColumn("  [bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)

    @contextlib.contextmanager
    def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        try:
            yield advance
        finally:
            progress.remove_task(task)

    def on_stage(key: str, status: str) -> None:
        if status != "running":
            console.print(f"[bold]{key}[/]: {status}")

    console.print(f"Running [bold]{pipeline.config.name}[/] ({len(pipeline.stages)} stages) in {run_dir}")
    with progress:
        summary = run_pipeline(pipeline, run_dir, resume=resume, device=device, progress_factory=bar, on_stage=on_stage)
    table = Table(title=f"{pipeline.config.name}: {summary.run_dir}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("metrics", overflow="fold")
    for key, secs in summary.seconds.items():
        m = summary.metrics["stages"].get(key, {})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
                          if isinstance(v, (int, float, str)))
        table.add_row(key + (" (skipped)" if key in summary.skipped else ""), f"{secs:.1f}", shown[:200])
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_command)
    app.command("run")(run_command)
