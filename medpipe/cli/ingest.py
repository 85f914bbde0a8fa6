"""``medpipe ingest SRC --out DIR``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text


def ingest_command(
    src: str = typer.Argument(..., help="Folder (searched recursively), .zip, DICOMDIR, DICOM / NIfTI file, or a PACS "
                                        "query pacs://NODE?StudyDate=...&Modality=MR (pulled into OUT/pacs/NODE; with "
                                        "--deidentify beside OUT, into OUT.pacs/NODE)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: catalog, volumes, manifest.csv, rejected.csv."),
    workers: int = typer.Option(0, help="Worker processes (0: one per CPU core)."),
    compress: bool = typer.Option(True, "--compress/--no-compress", help="Write .nii.gz (default) or .nii."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    deidentify: bool = typer.Option(False, "--deidentify", help="De-identify on the way in (as `medpipe deid`): "
                                                                 "nothing in OUT holds the source's PHI. Needs --key."),
    key: Path = typer.Option(None, "--key", "-k", help="With --deidentify: the key file (created 0600 if absent)."),
    profile: list[str] = typer.Option(None, "--profile", "-p", help="With --deidentify: profile options (see "
                                                                     "`medpipe deid --help`)."),
    map_path: Path = typer.Option(None, "--map", help="With --deidentify: the private map (default KEYFILE.map.json)."),
    allow_burned_in: bool = typer.Option(False, "--allow-burned-in", help="With --deidentify: also images that may "
                                                                          "carry burned-in text."),
    pacs: Path = typer.Option(None, "--pacs", help="PACS node file for pacs:// sources."),
) -> None:
    """Index DICOM (and NIfTI) into a catalog, check geometry and write one NIfTI volume per series."""
    from medpipe.cli.progress import RichProgress
    from medpipe.errors import ConfigError
    from medpipe.ingest import ingest

    settings = None
    if deidentify:
        from medpipe.cli.deid import deid_settings

        if key is None:
            raise ConfigError("--deidentify needs --key KEYFILE", hint="give a key file path (created if absent)")
        settings = deid_settings(key, map_path, profile, None, allow_burned_in, False)
    elif key is not None or profile or map_path is not None or allow_burned_in:
        raise ConfigError("--key, --profile, --map and --allow-burned-in only apply with --deidentify")
    console = Console(stderr=False, quiet=quiet)
    source = Path(src)
    if src.lower().startswith("pacs://"):
        from medpipe.pacs.source import pull_source

        # the pulled studies are the identified source: with --deidentify they stay out of OUT, beside it
        cache = out.parent / f"{out.name}.pacs" if deidentify else out / "pacs"
        source, pulled = pull_source(src, cache, pacs)
        console.print(f"pulled {pulled.received} new instance(s) ({pulled.already} already here) into {source}")
    with RichProgress(console) as progress:
        report = ingest(source, out, workers=workers or None, compress=compress, progress=progress,
                        deidentify=settings)
    if quiet:
        return
    # header text and paths come from the data: printed as plain text (never read as rich markup)
    table = Table(title=Text(f"Series in {report.out}"), show_lines=False)
    for col in ("patient", "#", "description", "modality", "files", "shape", "status", "reasons"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "warning": "yellow", "rejected": "red"}
    for v in report.volumes[:50]:
        table.add_row(
            Text(v["patient_id"] or ""), Text(str(v["series_number"] or "")),
            Text((v["series_description"] or "") + (f" [{v['part']}]" if v["part"] else "")),
            Text(v["modality"] or ""), Text(str(v["n_files"])), Text(v["shape"] or ""),
            Text(v["status"], style=style.get(v["status"], "")), Text((v["reasons"] or "")[:120]),
        )
    console.print(table)
    if len(report.volumes) > 50:
        console.print(Text(f"... and {len(report.volumes) - 50} more series (see manifest.csv)"))
    status = Counter(v["status"] for v in report.volumes)
    reasons = Counter(r.split(":")[0][:60] for _, r in report.rejected)
    console.print(Text.assemble(
        (str(report.n_files), "bold"),
        f" files ({report.n_read} read, {report.n_files - report.n_read} unchanged), "
        f"{len(report.volumes)} volumes: {status.get('ok', 0)} ok, {status.get('warning', 0)} warning, "
        f"{status.get('rejected', 0)} rejected; {report.n_built} written in {report.seconds['total']:.1f} s",
    ))
    if report.rejected:
        console.print(Text(f"{len(report.rejected)} files not used (see rejected.csv):"))
        for reason, n in reasons.most_common(8):
            console.print(Text(f"  {n:6d}  {reason}"))


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_command)
