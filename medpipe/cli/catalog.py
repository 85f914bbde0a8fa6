"""``medpipe catalog DIR``: what an ingest output folder holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medpipe.errors import SourceError


def catalog_command(
    out: Path = typer.Argument(..., help="An ingest output folder (holds catalog.sqlite)."),
) -> None:
    """List patients, studies and series in an ingest catalog."""
    from medpipe.catalog import open_catalog

    path = out / "catalog.sqlite"
    if not path.is_file():
        raise SourceError(f"{out}: no catalog.sqlite here", hint="run `medpipe ingest SRC --out DIR` first")
    console = Console()
    # header text and paths come from the data: printed as plain text (never read as rich markup)
    with open_catalog(path) as cat:  # read-only: never rewrites the catalog, never blocks an ingest
        counts = cat.counts()
        table = Table(title=Text(str(out)))
        for col in ("patient", "study", "#", "description", "modality", "files", "shape", "status", "volume"):
            table.add_column(col, overflow="fold")
        for v in cat.volumes():
            table.add_row(*(Text(cell) for cell in (
                v.patient_id or "", (v.study_uid or "")[-12:], str(v.series_number or ""),
                (v.series_description or "") + (f" [{v.part}]" if v.part else ""), v.modality or "",
                str(v.n_files), v.shape or "", v.status, v.volume or "",
            )))
        objects = cat.objects()
    console.print(table)
    if objects:
        otable = Table(title="Non-image objects (not converted)")
        for col in ("patient", "kind", "description", "references series", "path"):
            otable.add_column(col, overflow="fold")
        for o in objects:
            otable.add_row(*(Text(cell or "") for cell in (
                o.patient_id, o.kind, o.series_description, "\\".join(o.referenced_series)[-24:], o.path)))
        console.print(otable)
    console.print(Text(
        f"{counts['patients']} patients, {counts['studies']} studies, {counts['series']} series, "
        f"{counts['instances']} instances; {counts['volumes']} volumes; "
        f"{counts['files']} files scanned, {counts['rejected_files']} rejected"
    ))


def register(app: typer.Typer) -> None:
    app.command("catalog")(catalog_command)
