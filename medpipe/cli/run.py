"""``medpipe run FILE`` and ``medpipe validate FILE [FILE ...]``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _expand(patterns: list[str]) -> list[Path]:
    """Files named or matched by glob patterns (a shell may have expanded them already)."""
    import glob

    from medpipe.errors import ConfigError

    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ConfigError(f"{pattern}: no pipeline file matches")
        out += [Path(m) for m in matches]
    return out


def validate_command(
    files: list[str] = typer.Argument(..., help="Pipeline YAML files or glob patterns (pipelines/*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value: key.path=value (repeatable)."),
) -> None:
    """Check pipeline files completely (stages, parameters, wiring, paths, MONAI transforms) without running them.

    Every problem of every file is printed, one line each; the exit code is 2 when any file has one.
    """
    from medpipe.config import load_pipeline
    from medpipe.errors import ConfigError, MedpipeError

    console = Console(highlight=False)
    failed = 0
    paths = _expand(files)
    for path in paths:
        try:
            pipeline = load_pipeline(path, set_)
        except MedpipeError as exc:
            failed += 1
            for line in str(exc).splitlines():
                typer.echo(f"error: {line}", err=True)
            continue
        for warning in pipeline.warnings:
            typer.echo(f"warning: {warning}", err=True)
        kinds = ", ".join(s.kind for s in pipeline.stages)
        console.print(f"[green]ok[/] {escape(str(path))}: {escape(pipeline.config.name)}, {len(pipeline.stages)} "
                      f"stages ({kinds})")
    if failed:
        raise ConfigError(f"{failed} of {len(paths)} pipeline file(s) have problems (listed above)")


def run_command(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default: a new numbered folder "
                                                       "runs/<pipeline name>/NNN, with runs/<name>/latest)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value: key.path=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run (without --out: the latest one): skip "
                                                        "stages whose inputs and parameters are unchanged."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in an --out that holds a run."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda (default: the pipeline's device)."),
) -> None:
    """Validate, then run a pipeline; results, checkpoints and metrics go to the run directory."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from medpipe.config import load_pipeline
    from medpipe.errors import ConfigError
    from medpipe.runner import latest_run_dir, next_run_dir, run_pipeline

    if device not in (None, "auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device}: expected auto, cpu or cuda")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    pipeline = load_pipeline(file, set_)
    console = Console(highlight=False)
    for warning in pipeline.warnings:
        typer.echo(f"warning: {warning}", err=True)
    base = Path("runs") / pipeline.config.name
    if out is not None:
        run_dir = out
    elif resume:
        latest = latest_run_dir(base)
        if latest is None:
            raise ConfigError(f"--resume: no earlier run of {pipeline.config.name} in {base}",
                              hint="give the run folder with --out, or leave out --resume")
        run_dir = latest
    else:
        run_dir = next_run_dir(base)
    progress = Progress(TextColumn("  [bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=console)

    class Advance:
        """Advances a bar; ``note(text)`` shows a short status beside it (e.g. the epoch's loss)."""

        def __init__(self, task: object) -> None:
            self.task = task

        def __call__(self, n: int = 1) -> None:
            progress.update(self.task, advance=n)  # type: ignore[arg-type]

        def note(self, text: str) -> None:
            progress.update(self.task, info=escape(text[:60]))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def bar(description: str, total: int) -> Iterator[Callable[..., None]]:
        task = progress.add_task(escape(description), total=total, info="")
        try:
            yield Advance(task)
        finally:
            progress.remove_task(task)

    def on_stage(key: str, status: str) -> None:
        if status != "running":
            console.print(f"[bold]{key}[/]: {status}")

    console.print(f"Running [bold]{escape(pipeline.config.name)}[/] ({len(pipeline.stages)} stages) in "
                  f"{escape(str(run_dir))}")
    with progress:
        summary = run_pipeline(pipeline, run_dir, resume=resume, overwrite=overwrite, device=device,
                               progress_factory=bar, on_stage=on_stage)
    table = Table(title=f"{escape(pipeline.config.name)}: {escape(str(summary.run_dir))}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("metrics", overflow="fold")
    for key, secs in summary.seconds.items():
        m = summary.metrics["stages"].get(key, {})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
                          if isinstance(v, (int, float, str)))
        table.add_row(key + (" (skipped)" if key in summary.skipped else ""), f"{secs:.1f}", escape(shown[:200]))
    console.print(table)
    _where_to_look(console, summary)


#: artifacts worth pointing at after a run, in the order shown
_LOOK_AT = (("report", "report"), ("model", "model package"), ("scores", "scored export"), ("masks", "masks"),
            ("evaluation", "evaluation"), ("class_predictions", "predictions"), ("explanations", "explanations"),
            ("checkpoint", "checkpoint"), ("datalist", "datalist"))


def _where_to_look(console: Console, summary: object) -> None:
    run_dir = Path(getattr(summary, "run_dir"))
    artifacts: dict[str, object] = dict(getattr(summary, "artifacts", {}) or {})
    rows: list[tuple[str, str]] = []
    if (run_dir / "report.html").is_file():
        rows.append(("report", str(run_dir / "report.html")))
    rows.append(("metrics", str(run_dir / "metrics.json")))
    for key, label in _LOOK_AT[1:]:
        value = artifacts.get(key)
        if value:
            shown = value[0] if isinstance(value, list) else value
            rows.append((label, str(shown) + (f" (+{len(value) - 1} more)" if isinstance(value, list) and
                                               len(value) > 1 else "")))
    rows.append(("log", str(run_dir / "run.log")))
    console.print("[bold]Where to look[/] (the model package is what `medpipe score --model` takes)")
    for label, path in rows:
        console.print(f"  {escape(label):<14} {escape(path)}", overflow="fold")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_command)
    app.command("run")(run_command)
