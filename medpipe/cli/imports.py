"""``medpipe import ...``: bring public benchmark datasets into medpipe's datalist form.

Thin: parse, call :mod:`medpipe.data.medmnist`, print a summary.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``import`` command group to ``app``."""
    import_app = typer.Typer(
        help="Import public datasets (images + labels CSV + datalist with the official split).",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
    )

    @import_app.command("medmnist")
    def medmnist(
        npz: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, resolve_path=True,
                                   help="A MedMNIST .npz file, e.g. breastmnist.npz."),
        out: Path = typer.Option(..., "--out", "-o", file_okay=False, resolve_path=True,
                                 help="Output folder (created if missing)."),
        name: str = typer.Option(None, "--name", help="Dataset name (default: from the file name)."),
    ) -> None:
        """Write the images (PNG, or NIfTI for 3D), labels.csv and datalist.json with the official split."""
        from medpipe.data.medmnist import import_medmnist

        s = import_medmnist(npz, out, name=name)
        what = "wrote" if s.written else "already there, nothing rewritten:"
        counts = ", ".join(f"{k} {v} ({'/'.join(map(str, s.class_counts[k]))} per class)" for k, v in s.counts.items())
        typer.echo(f"{s.name}: {what} {sum(s.counts.values())} images in {s.out}: {counts}")
        typer.echo(f"datalist: {s.datalist}")

    app.add_typer(import_app, name="import")
