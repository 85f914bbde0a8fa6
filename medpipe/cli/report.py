"""``medpipe report RUN [RUN ...] [--out FILE]``: rebuild a run's report.html, or compare runs side by side.

``medpipe report INGEST_DIR`` writes the QA page of a ``medpipe ingest`` output folder.
"""

from __future__ import annotations

from pathlib import Path

import typer

#: where a comparison goes without --out
DEFAULT_COMPARISON = Path("comparison.html")


def report_command(
    runs: list[Path] = typer.Argument(..., help="Run directories (what `medpipe run` wrote). One: its report; "
                                                "several: a comparison. Or one `medpipe ingest` output folder: "
                                                "its QA page."),
    out: Path = typer.Option(None, "--out", "-o", help="The HTML file to write (default: RUN/report.html for one "
                                                       f"run, ./{DEFAULT_COMPARISON} for several)."),
) -> None:
    """Write a self-contained HTML report of a run (or an ingest's QA page), or compare runs side by side."""
    from medpipe.errors import ConfigError
    from medpipe.report.compare import write_comparison
    from medpipe.report.html import write_report

    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a folder", hint="give the HTML file to write, e.g. --out report.html")
    if len(runs) == 1:
        path = write_report(runs[0], out)
    else:
        path = write_comparison(runs, out or DEFAULT_COMPARISON)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
