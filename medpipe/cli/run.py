"""``medpipe run FILE`` and ``medpipe validate FILE [FILE ...]``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from medpipe.config import Pipeline
    from medpipe.distributed.group import Distributed


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
    nproc: int = typer.Option(None, "--nproc", min=1, max=1024,
                              help="Train with DistributedDataParallel in N processes on this machine (one per GPU; "
                                   "gloo on CPU); the other stages run once. Multi-node: run the same command "
                                   "under torchrun instead."),
) -> None:
    """Validate, then run a pipeline; results, checkpoints and metrics go to the run directory."""
    from medpipe.config import load_pipeline
    from medpipe.distributed.group import launched
    from medpipe.errors import ConfigError

    if device not in (None, "auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device}: expected auto, cpu or cuda")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    if nproc is not None and nproc > 1 and launched() is not None:
        raise ConfigError("--nproc inside a torchrun job: torchrun already started the processes",
                          hint="leave out --nproc (or run without torchrun)")
    pipeline = load_pipeline(file, set_)
    if nproc is not None and nproc > 1:
        _launch(pipeline, file, out, set_, resume, overwrite, device, nproc)
    elif launched() is not None:
        _run_rank(pipeline, out, resume, overwrite, device)
    else:
        _run_here(pipeline, _choose_run_dir(pipeline, out, resume), resume, overwrite, device)


def _choose_run_dir(pipeline: Pipeline, out: Path | None, resume: bool) -> Path:
    """``--out``, else the latest run (``--resume``), else a new numbered folder."""
    from medpipe.errors import ConfigError
    from medpipe.runner import latest_run_dir, next_run_dir

    name = pipeline.config.name
    base = Path("runs") / name
    if out is not None:
        return out
    if resume:
        latest = latest_run_dir(base)
        if latest is None:
            raise ConfigError(f"--resume: no earlier run of {name} in {base}",
                              hint="give the run folder with --out, or leave out --resume")
        return latest
    return next_run_dir(base)


def _run_here(pipeline: Pipeline, run_dir: Path, resume: bool, overwrite: bool, device: str | None,
              dist: Distributed | None = None) -> None:
    """Run the pipeline in this process (a one-process run, or rank 0 of a distributed one): progress bars, the
    stage table and where to look."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from medpipe.distributed.group import SINGLE
    from medpipe.runner import run_pipeline

    config = pipeline.config
    console = Console(highlight=False)
    for warning in pipeline.warnings:
        typer.echo(f"warning: {warning}", err=True)
    progress = Progress(TextColumn("  [bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=console)

    class Advance:
        """Advances a bar; ``note(text)`` shows a short status beside it (e.g. the epoch's loss)."""

        def __init__(self, task: object) -> None:
            self.task = task

        def __call__(self, n: int = 1) -> None:
            progress.update(self.task, advance=n)

        def note(self, text: str) -> None:
            progress.update(self.task, info=escape(text[:60]))

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

    console.print(f"Running [bold]{escape(config.name)}[/] ({len(pipeline.stages)} stages) in "
                  f"{escape(str(run_dir))}")
    with progress:
        summary = run_pipeline(pipeline, run_dir, resume=resume, overwrite=overwrite, device=device,
                               progress_factory=bar, on_stage=on_stage, dist=dist or SINGLE)
    table = Table(title=f"{escape(config.name)}: {escape(str(summary.run_dir))}")
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


def _launch(pipeline: Pipeline, file: Path, out: Path | None, set_: list[str], resume: bool, overwrite: bool,
            device: str | None, nproc: int) -> None:
    """``--nproc N``: the same command as N processes of one job (:mod:`medpipe.distributed.launch`), all in the
    run folder chosen here."""
    from medpipe.cli import _state
    from medpipe.distributed.launch import launch

    run_dir = _choose_run_dir(pipeline, out, resume)
    args = ["run", str(file), "--out", str(run_dir)]
    for value in set_:
        args += ["--set", value]
    if resume:
        args.append("--resume")
    if overwrite:
        args.append("--overwrite")
    if device:
        args += ["--device", device]
    if _state["verbose"]:
        args.insert(0, "--verbose")
    launch(nproc, args)


def _run_rank(pipeline: Pipeline, out: Path | None, resume: bool, overwrite: bool, device: str | None) -> None:
    """One rank of a distributed run (started by torchrun or ``--nproc``): join the others; rank 0 runs the
    pipeline as a one-process run would and alone writes the run folder, the others follow it quietly. A
    failure is reported once for the job (:meth:`Distributed.report_failure`): the first rank to fail says its
    line (``error: rank R: ...``; under ``--nproc`` the launcher says it), the others stop without a word."""
    from medpipe.distributed.group import ERRORS_ENV, PeerFailed, join, write_error_files
    from medpipe.errors import Interrupted, MedpipeError
    from medpipe.inference.device import resolve_device
    from medpipe.runner import run_pipeline

    use_cuda = resolve_device(device or pipeline.config.device)[0] == "cuda"
    dist = join(use_cuda)
    try:
        if dist.is_main:
            run_dir = _choose_run_dir(pipeline, out, resume)
            dist.publish("run_dir", str(run_dir.resolve()))
            _run_here(pipeline, run_dir, resume, overwrite, device, dist)
        else:
            run_dir = Path(dist.wait("run_dir"))
            run_pipeline(pipeline, run_dir, resume=resume, overwrite=overwrite, device=device,
                         dist=dist)
    except PeerFailed:
        raise typer.Exit(2) from None  # another rank's failure is the job's message
    except (KeyboardInterrupt, Interrupted) as exc:
        if dist.is_main:
            message = str(exc) if isinstance(exc, Interrupted) else "interrupted"
            hint = exc.hint if isinstance(exc, Interrupted) else None
            write_error_files(dist, message, hint, interrupted=True)
            if not os.environ.get(ERRORS_ENV):
                raise
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        line = text[0] if isinstance(exc, MedpipeError) and text else \
            f"{type(exc).__name__}: {text[0] if text else ''}"
        if not dist.report_failure(line):
            raise typer.Exit(2) from None  # failed because another rank failed first
        hint = exc.hint if isinstance(exc, MedpipeError) else None
        write_error_files(dist, line, hint)
        if isinstance(exc, MedpipeError):
            if os.environ.get(ERRORS_ENV):  # the launcher says it, once for the job
                raise typer.Exit(2) from None
            raise MedpipeError(f"rank {dist.rank}: {line}", hint=hint) from None
        raise  # a bug: its traceback, as in a one-process run
    finally:
        dist.close()


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
