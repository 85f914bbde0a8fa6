"""The ``medpipe`` command line: one module per command, joined here.

Commands stay thin (parse, call the library, render). Heavy libraries (torch, MONAI,
highdicom) are imported inside the commands that need them, so ``medpipe --help`` and
``medpipe ingest`` start fast.
"""

from __future__ import annotations

import logging
import sys

import typer
from typer.core import TyperGroup

from medpipe.errors import MedpipeError

_state = {"verbose": False}


class _MedpipeGroup(TyperGroup):
    """The one place user errors become one line (plus a hint) and a non-zero exit code."""

    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]
        from medpipe.errors import Interrupted

        try:
            return super().invoke(ctx)
        except MedpipeError as exc:
            if _state["verbose"]:
                raise
            interrupted = isinstance(exc, Interrupted)
            for line in str(exc).splitlines() or [""]:
                typer.echo(f"{'' if interrupted else 'error: '}{line}", err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(130 if interrupted else 2) from None
        except KeyboardInterrupt:
            if _state["verbose"]:
                raise
            typer.echo("interrupted; outputs are written atomically and a re-run continues", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_MedpipeGroup,
    name="medpipe",
    help="DICOM-native medical imaging pipelines: ingest a PACS export, train, score, write DICOM back.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold patient data
    add_completion=False,
)

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"medpipe {version('medpipe')}")
        except PackageNotFoundError:  # pragma: no cover - a source tree without install
            typer.echo("medpipe (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print medpipe's version and exit."),
) -> None:
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from medpipe.errors import not_reported_by_cli

    for handler in logging.getLogger().handlers:  # the console; run.log keeps INFO (see runner)
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
        if not verbose:  # a failed stage's problem is the command's one-line error, not also a log line
            handler.addFilter(not_reported_by_cli)


def _register() -> None:
    from medpipe.cli import catalog, deid, imports, ingest, listen, pacs, report, run, sample, score

    ingest.register(app)
    catalog.register(app)
    sample.register(app)
    run.register(app)
    imports.register(app)
    score.register(app)
    report.register(app)
    deid.register(app)
    pacs.register(app)
    listen.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    app(args=sys.argv[1:] if argv is None else argv)
