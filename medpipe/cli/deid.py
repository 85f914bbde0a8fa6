"""``medpipe deid SRC --out DIR --key KEYFILE`` and ``medpipe reidentify RESULTS --key KEYFILE --map MAPFILE``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

PROFILE_HELP = ("Options of PS3.15 Table E.1-1 on top of the Basic Profile, comma-separated or repeated: "
                "retain-modified-dates, retain-full-dates, retain-patient-characteristics, retain-device-identity, "
                "retain-institution-identity, clean-descriptors, retain-safe-private, retain-uids "
                "('basic' alone: none).")


def profile_options(values: list[str] | None):  # type: ignore[no-untyped-def]  # -> ProfileOptions
    """``--profile`` values (comma lists, repeated) as ProfileOptions; 'basic' names the Basic Profile."""
    from medpipe.deid.table import ProfileOptions

    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip() and n.strip() != "basic"]
    return ProfileOptions.from_names(names)


def deid_settings(key: Path, map_path: Path | None, profile: list[str] | None, patients: Path | None,
                  allow_burned_in: bool, ocr: bool):  # type: ignore[no-untyped-def]  # -> DeidSettings
    from medpipe.deid.run import DeidSettings

    return DeidSettings(key=key, map=map_path, options=profile_options(profile), patients=patients,
                        allow_burned_in=allow_burned_in, ocr=ocr)


def deid_command(
    src: Path = typer.Argument(..., help="Folder (searched recursively), .zip, DICOMDIR, or one DICOM file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the de-identified tree, rejected.csv, deid.json."),
    key: Path = typer.Option(..., "--key", "-k", help="Key file (created with mode 0600 if absent; keep it private "
                                                      "and outside OUT)."),
    profile: list[str] = typer.Option(None, "--profile", "-p", help=PROFILE_HELP),
    map_path: Path = typer.Option(None, "--map", help="Private map original <-> pseudonym (JSON, 0600; default: "
                                                      "KEYFILE.map.json). Must not be inside OUT."),
    patients: Path = typer.Option(None, "--patients", help="CSV with PatientID, PseudonymID[, PseudonymName]: your "
                                                           "pseudonyms for these patients."),
    allow_burned_in: bool = typer.Option(False, "--allow-burned-in", help="Also write images that may carry "
                                         "burned-in text (Burned In Annotation YES; US / SC / OT without NO)."),
    ocr: bool = typer.Option(False, "--ocr", help="Also read each image's pixels with Tesseract and quarantine "
                                                  "those where it finds text (needs tesseract-ocr)."),
    workers: int = typer.Option(0, help="Worker processes (0: one per CPU core)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """De-identify a DICOM export (PS3.15 Basic Profile + options): a copy with keyed pseudonyms and new UIDs."""
    from medpipe.cli.progress import RichProgress
    from medpipe.deid.run import deidentify

    settings = deid_settings(key, map_path, profile, patients, allow_burned_in, ocr)
    console = Console(quiet=quiet)
    with RichProgress(console) as progress:
        report = deidentify(src, out, settings, workers=workers or None, progress=progress)
    if report.key_created:
        console.print(f"[yellow]new key written to {escape(str(key))} (mode 0600): keep it private; the same key "
                      "gives the same pseudonyms next time[/]")
    console.print(f"[bold]{report.n_files}[/] files ({report.n_done} processed, {report.n_files - report.n_done} "
                  f"done before): {report.written} written, {len(report.rejected)} not written, in "
                  f"{report.seconds:.1f} s -> {escape(str(report.out))}")
    console.print(f"map (private, 0600): {escape(str(report.map_path))}")
    if report.rejected:
        console.print("not written (see rejected.csv; the map's 'files' section gives each reference's source path):")
        for reason, n in Counter(r for _, r in report.rejected).most_common(8):
            console.print(f"  {n:6d}  {escape(reason)}")


def reidentify_command(
    results: Path = typer.Argument(..., help="Folder of results made on de-identified data (e.g. medpipe score's "
                                             "OUT/results), or one DICOM file."),
    key: Path = typer.Option(..., "--key", "-k", help="The key the data was de-identified with."),
    map_path: Path = typer.Option(..., "--map", help="The map written by `medpipe deid` / `ingest --deidentify`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/<PatientID>/<StudyInstanceUID>/*.dcm."),
) -> None:
    """Turn SEG / SR / maps made on de-identified data into objects of the original study, ready for the PACS."""
    from medpipe.deid.reidentify import reidentify

    report = reidentify(results, out, key, map_path)
    console = Console()
    console.print(f"{len(report.written)} objects re-identified -> {escape(str(report.out))}"
                  + (f"; {len(report.rejected)} not (see rejected.csv)" if report.rejected else ""))


def register(app: typer.Typer) -> None:
    app.command("deid")(deid_command)
    app.command("reidentify")(reidentify_command)
