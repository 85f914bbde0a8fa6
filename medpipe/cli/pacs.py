"""``medpipe pacs nodes|echo|find|pull|push``: talk to a PACS named in the node file (``--pacs FILE``)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

pacs_app = typer.Typer(help="Query, pull from and push to a PACS (DIMSE and DICOMweb); nodes in a YAML/TOML file.",
                       no_args_is_help=True, pretty_exceptions_show_locals=False)

PACS_OPTION = typer.Option(None, "--pacs", help="PACS node file (YAML or TOML); default $MEDPIPE_PACS, else "
                                                "pacs.yaml in the user's config folder.")
NODE_ARG = typer.Argument(..., help="Node name in the node file.")


def _node(pacs: Path | None, name: str):  # type: ignore[no-untyped-def]
    from medpipe.pacs.nodes import load_nodes

    return load_nodes(pacs).get(name)


def _query(patient_id: str | None, study_date: str | None, modality: str | None, accession: str | None,
           description: str | None, studies: list[str] | None):  # type: ignore[no-untyped-def]
    from medpipe.pacs.query import StudyQuery

    return StudyQuery(patient_id=patient_id, study_date=study_date, modality=modality.upper() if modality else None,
                      accession=accession, description=description, study_uids=tuple(studies or ()))


@pacs_app.command("nodes")
def nodes_command(pacs: Path = PACS_OPTION) -> None:
    """List the nodes of the node file."""
    from medpipe.pacs.nodes import load_nodes

    nf = load_nodes(pacs)
    table = Table(title=escape(str(nf.path)))
    for col in ("node", "DIMSE", "we are", "DICOMweb", "retrieve"):
        table.add_column(col, overflow="fold")
    for n in nf.nodes.values():
        table.add_row(escape(n.name), escape(f"{n.ae_title}@{n.host}:{n.port}" if n.has_dimse else "-"),
                      escape(f"{n.our_ae_title}, port {n.our_port}"), escape(n.dicomweb or "-"), ", ".join(n.retrieve))
    Console().print(table)


@pacs_app.command("echo")
def echo_command(node: str = NODE_ARG, pacs: Path = PACS_OPTION,
                 via: str = typer.Option("all", "--via", help="dimse, dicomweb, or all the node has.")) -> None:
    """C-ECHO (and a QIDO-RS request when the node has a DICOMweb URL): is the PACS there and does it answer us?"""
    from medpipe.errors import ConfigError

    n = _node(pacs, node)
    if via not in ("all", "dimse", "dicomweb"):
        raise ConfigError(f"--via {via}: expected dimse, dicomweb or all")
    console = Console()
    if via in ("all", "dimse") and (n.has_dimse or via == "dimse"):
        from medpipe.pacs.dimse import echo

        ms = echo(n)
        console.print(f"C-ECHO {escape(n.our_ae_title)} -> {escape(n.ae_title or '')} at {n.host}:{n.port}: "
                      f"[green]ok[/] ({ms:.0f} ms)")
    if via in ("all", "dicomweb") and (n.dicomweb or via == "dicomweb"):
        from medpipe.pacs.web import echo as web_echo

        ms = web_echo(n)
        console.print(f"QIDO-RS {escape(n.dicomweb or '')}: [green]ok[/] ({ms:.0f} ms)")


@pacs_app.command("find")
def find_command(
    node: str = NODE_ARG,
    patient_id: str = typer.Option(None, "--patient-id", help="Patient ID (wildcards * and ? allowed)."),
    study_date: str = typer.Option(None, "--study-date", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD."),
    modality: str = typer.Option(None, "--modality", help="Studies holding this modality (MR, CT, ...)."),
    accession: str = typer.Option(None, "--accession", help="Accession number."),
    description: str = typer.Option(None, "--description", help="Study description (wildcards allowed)."),
    study: list[str] = typer.Option(None, "--study", help="Study Instance UID (repeat for several)."),
    series: bool = typer.Option(False, "--series", help="One row per series instead of per study."),
    csv_out: str = typer.Option(None, "--csv", help="Write CSV to this file ('-': standard output) instead of a table."),
    via: str = typer.Option("dimse", "--via", help="dimse (C-FIND) or dicomweb (QIDO-RS)."),
    pacs: Path = PACS_OPTION,
) -> None:
    """Find studies (or series) at a PACS: C-FIND or QIDO-RS."""
    from medpipe.errors import ConfigError
    from medpipe.pacs.listing import finder

    if via not in ("dimse", "dicomweb"):
        raise ConfigError(f"--via {via}: expected dimse or dicomweb")
    n = _node(pacs, node)
    q = _query(patient_id, study_date, modality, accession, description, study)
    with finder(n, via == "dicomweb" or not n.has_dimse) as f:
        studies = f.studies(q)
        if series:
            keys = ["PatientID", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
                    "SeriesDescription", "NumberOfSeriesRelatedInstances"]
            rows = []
            for st in studies:
                for se in f.series(st["StudyInstanceUID"], q.modality):
                    rows.append({**{k: st[k] for k in ("PatientID", "StudyDate")}, **{k: se[k] for k in keys[2:]}})
        else:
            keys = ["PatientID", "PatientName", "StudyDate", "AccessionNumber", "ModalitiesInStudy", "StudyDescription",
                    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyInstanceUID"]
            rows = [{k: st[k] for k in keys} for st in studies]
    if csv_out is not None:
        from medpipe.io import csv_text, write_csv_atomic

        if csv_out == "-":
            sys.stdout.write(csv_text(rows, keys))
        else:
            write_csv_atomic(Path(csv_out), rows, keys)
            Console(stderr=True).print(f"{len(rows)} row(s) -> {escape(csv_out)}")
        return
    short = {"NumberOfStudyRelatedSeries": "series", "NumberOfStudyRelatedInstances": "instances",
             "NumberOfSeriesRelatedInstances": "instances", "StudyInstanceUID": "study UID",
             "SeriesInstanceUID": "series UID", "ModalitiesInStudy": "modalities", "AccessionNumber": "accession"}
    table = Table(title=f"{len(rows)} {'series' if series else 'stud' + ('y' if len(rows) == 1 else 'ies')} at "
                        f"{escape(n.name)}")
    for k in keys:
        table.add_column(short.get(k, k), overflow="fold")
    for r in rows:
        table.add_row(*(escape(str(r[k])) for k in keys))
    Console().print(table)


@pacs_app.command("pull")
def pull_command(
    node: str = NODE_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Folder receiving OUT/<study>/<series>/<instance>.dcm."),
    study: list[str] = typer.Option(None, "--study", help="Study Instance UID (repeat for several)."),
    patient_id: str = typer.Option(None, "--patient-id", help="Query: Patient ID."),
    study_date: str = typer.Option(None, "--study-date", help="Query: YYYYMMDD or YYYYMMDD-YYYYMMDD."),
    modality: str = typer.Option(None, "--modality", help="Query: studies with this modality; only its series."),
    accession: str = typer.Option(None, "--accession", help="Query: accession number."),
    description: str = typer.Option(None, "--description", help="Query: study description."),
    via: str = typer.Option("auto", "--via", help="auto (the node's retrieve order: move, get, wado), move, get "
                                                  "or wado."),
    pacs: Path = PACS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Pull studies: C-MOVE to medpipe's own storage SCP, else C-GET, else WADO-RS; instances already there are skipped."""
    from medpipe.cli.progress import RichProgress
    from medpipe.errors import ConfigError
    from medpipe.pacs.pull import LABELS, pull

    if via not in ("auto", *LABELS):
        raise ConfigError(f"--via {via}: expected auto, move, get or wado")
    n = _node(pacs, node)
    q = _query(patient_id, study_date, modality, accession, description, study)
    console = Console(quiet=quiet)
    with RichProgress(console) as progress:
        report = pull(n, q, out, methods=None if via == "auto" else (via,),
                      on_listed=lambda expected, todo: progress.start("Pulling", todo),
                      on_instance=lambda path: progress.advance(1))
    for w in report.warnings:
        Console(stderr=True).print(f"[yellow]warning:[/] {escape(w)}")
    if not report.series:
        console.print(f"no study at {escape(n.name)} matches {escape(q.describe())}")
        return
    used = ", ".join(f"{LABELS[m]} {k}" for m, k in report.by_method.items() if k) or "nothing to fetch"
    secs = report.seconds
    rate = report.received / secs["transfer"] if secs.get("transfer") else 0.0
    console.print(f"{len(report.studies)} stud{'y' if len(report.studies) == 1 else 'ies'}, {len(report.series)} "
                  f"series, {report.expected} instances: {report.already} already here, {report.received} pulled "
                  f"({used}) in {secs['total']:.1f} s ({rate:.0f} instances/s) -> {escape(str(report.out))}")


@pacs_app.command("push")
def push_command(
    node: str = NODE_ARG,
    files: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)."),
    via: str = typer.Option(None, "--via", help="dimse (C-STORE; default when the node has DIMSE) or dicomweb "
                                                "(STOW-RS)."),
    pacs: Path = PACS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
) -> None:
    """Send DICOM files (e.g. the SEG / SR / Parametric Map of `medpipe score`) with C-STORE or STOW-RS."""
    from medpipe.errors import ConfigError
    from medpipe.pacs.push import collect, push

    if via not in (None, "dimse", "dicomweb"):
        raise ConfigError(f"--via {via}: expected dimse or dicomweb")
    n = _node(pacs, node)
    paths = collect(files)
    if not paths:
        raise ConfigError("no files to push")
    report = push(n, paths, via=via)  # type: ignore[arg-type]
    console = Console(quiet=quiet)
    bad = report.failed
    for r in bad[:20]:
        Console(stderr=True).print(f"[red]failed:[/] {escape(str(r.path))}: {escape(r.detail)}")
    c = report.counts
    console.print(f"{len(report.results)} file(s) to {escape(n.name)} by {'C-STORE' if report.via == 'dimse' else 'STOW-RS'}"
                  f": {c.get('ok', 0)} stored, {c.get('warning', 0)} with warnings, {len(bad)} failed "
                  f"({report.seconds:.1f} s)")
    report.raise_for_failures()


def register(app: typer.Typer) -> None:
    app.add_typer(pacs_app, name="pacs")
