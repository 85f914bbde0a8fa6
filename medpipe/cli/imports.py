"""``medpipe import ...``: bring datasets into medpipe's datalist form.

``medmnist`` (public benchmark files) and ``nnunet`` / ``msd`` / ``csv`` (your own NIfTI cases in the
layouts of nnU-Net v2, the Medical Segmentation Decathlon, or a CSV). Thin: parse, call
:mod:`medpipe.data.medmnist` / :mod:`medpipe.data.nifti_datasets`, print a summary.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``import`` command group to ``app``."""
    import_app = typer.Typer(
        help="Import datasets into a datalist: MedMNIST files (official split), and your own NIfTI cases in the "
             "nnU-Net, Decathlon or CSV layout.",
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
        typer.echo("split: the official one (the file's MD5 is the published file's)" if s.official else
                   "split: as in the file, NOT certified official (its MD5 is not the published file's: modified, "
                   "re-saved or unknown)")
        typer.echo(f"datalist: {s.datalist}")

    def nifti(fmt: str, src: Path, out: Path, reference: str | None, label_names: str | None, val: float, test: float,
              folds: int | None, fold: int, seed: int) -> None:
        from medpipe.data.nifti_datasets import import_nifti_dataset

        s = import_nifti_dataset(fmt, src, out, reference=reference, label_names=_label_names(label_names), val=val,
                                 test=test, folds=folds, fold=fold, seed=seed)
        counts = ", ".join(f"{k} {v}" for k, v in s.counts.items())
        typer.echo(f"{fmt} {src}: {sum(s.counts.values())} cases ({counts}); channels {', '.join(s.channels)} on the "
                   f"{s.reference} grid; labels "
                   f"{', '.join(f'{k}={v}' for k, v in sorted(s.label_names.items())) or 'none (no label maps)'}")
        for note in s.notes:
            typer.echo(f"note: {note}")
        if s.resampled:
            typer.echo(f"resampled onto the {s.reference} grid ({len(s.resampled)}):")
            for line in s.resampled[:20]:
                typer.echo(f"  {line}")
        if s.skipped:
            typer.echo(f"skipped ({len(s.skipped)}):", err=True)
            for sk in s.skipped[:20]:
                typer.echo(f"  {sk['case_id']}: {sk['reason']}", err=True)
        typer.echo(f"datalist: {s.datalist}")

    def _command(fmt: str, what: str, is_file: bool) -> None:
        @import_app.command(fmt, help=f"Check and split {what} into DIR/datalist.json (no copy of the images unless "
                                      "resampled or split from 4D).")
        def command(
            src: Path = typer.Argument(..., exists=True, file_okay=is_file, dir_okay=not is_file, resolve_path=True,
                                       help=what[0].upper() + what[1:] + "."),
            out: Path = typer.Option(..., "--out", "-o", file_okay=False, resolve_path=True,
                                     help="Output folder (created if missing)."),
            reference: str = typer.Option(None, "--reference", help="Channel whose grid the others and the label "
                                                                    "map must be on (default: the first)."),
            label_names: str = typer.Option(None, "--label-names", help="Label names, e.g. '1=edema,2=tumour core' "
                                                                        "(default: the declared ones)."),
            val: float = typer.Option(0.2, "--val", min=0.0, max=0.95, help="Validation fraction (by patient)."),
            test: float = typer.Option(0.2, "--test", min=0.0, max=0.95, help="Test fraction (by patient)."),
            folds: int = typer.Option(None, "--folds", min=2, help="k folds over the non-test patients."),
            fold: int = typer.Option(0, "--fold", min=0, help="With --folds: the fold that is the val split."),
            seed: int = typer.Option(0, "--seed", min=0, help="Split seed."),
        ) -> None:
            nifti(fmt, src, out, reference, label_names, val, test, folds, fold, seed)

    _command("nnunet", "an nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)", False)
    _command("msd", "a Medical Segmentation Decathlon task folder (dataset.json, imagesTr, labelsTr)", False)
    _command("csv", "a CSV of cases: case_id, patient_id (optional), one column per channel, label (optional)", True)

    app.add_typer(import_app, name="import")


def _label_names(text: str | None) -> dict[int, str] | None:
    """``'1=edema,2=core'`` -> ``{1: 'edema', 2: 'core'}``."""
    from medpipe.errors import ConfigError

    if not text:
        return None
    out: dict[int, str] = {}
    for part in text.split(","):
        value, sep, name = part.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise ConfigError(f"--label-names: {part.strip()!r} is not VALUE=NAME (e.g. 1=edema,2=tumour core)")
        out[int(value)] = name.strip()
    return out
