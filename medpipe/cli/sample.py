"""``medpipe sample ...``: generate synthetic sample data for the offline demo and tests.

Thin: parse options, call :mod:`medpipe.sample`, render a progress bar and a summary. The
generator (numpy, scipy, pydicom, highdicom) is imported inside the command so that
``medpipe --help`` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``sample`` command group to ``app``."""
    sample_app = typer.Typer(
        help="Generate synthetic sample data (no download, deterministic from a seed).",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
    )

    @sample_app.command("brain-tumor")
    def brain_tumor(
        out: Path = typer.Argument(
            ..., file_okay=False, dir_okay=True, writable=True, resolve_path=True,
            help="Output folder (created if missing).",
        ),
        cases: int = typer.Option(12, "--cases", min=1, help="Number of patients (one study each)."),
        seed: int = typer.Option(0, "--seed", min=0, help="Random seed; the same seed gives identical files."),
        tumor_fraction: float = typer.Option(
            0.7, "--tumor-fraction", min=0.0, max=1.0,
            help="Fraction of cases with a tumour (both classes occur when cases >= 2).",
        ),
        matrix: int = typer.Option(128, "--matrix", min=8, help="Rows and columns per slice."),
        pixel_spacing: float = typer.Option(1.5, "--pixel-spacing", min=0.1, help="In-plane pixel size (mm)."),
        slices: int = typer.Option(32, "--slices", min=2, help="Slices per series."),
        slice_thickness: float = typer.Option(4.0, "--slice-thickness", min=0.1, help="Slice thickness (mm)."),
        force: bool = typer.Option(False, "--force", help="Regenerate even if OUT already holds this sample."),
    ) -> None:
        """Synthetic brain MR studies (T1, T1c, T2, FLAIR as DICOM) with a tumour DICOM SEG and labels.csv."""
        from rich.console import Console

        from medpipe.cli.progress import RichProgress
        from medpipe.sample import BrainTumorParams, existing_generation, generate_brain_tumor

        console = Console()
        params = BrainTumorParams(cases, seed, tumor_fraction, matrix, pixel_spacing, slices, slice_thickness)
        if not force and existing_generation(out, params) is not None:
            console.print(
                f"{out} already holds this sample ({cases} cases, seed {seed}); nothing to do "
                "(use --force to regenerate)."
            )
            return

        start = time.perf_counter()
        with RichProgress(console) as progress:
            progress.start("brain-tumor cases", cases)
            infos = generate_brain_tumor(
                out, cases, seed, tumor_fraction, matrix=matrix, pixel_spacing=pixel_spacing,
                slices=slices, slice_thickness=slice_thickness, force=force,
                progress=lambda _info: progress.advance(),
            )
        elapsed = time.perf_counter() - start

        n_tumor = sum(i.has_tumor for i in infos)
        volumes = [i.whole_tumor_ml for i in infos if i.has_tumor]
        size_mb = sum(f.stat().st_size for f in (out / "dicom").rglob("*.dcm")) / 1e6
        console.print(
            f"Wrote {len(infos)} cases ({n_tumor} with tumour, {len(infos) - n_tumor} without) "
            f"to {out} in {elapsed:.1f} s: {len(infos) * 4 * slices} MR images + {len(infos)} SEG, "
            f"{size_mb:.1f} MB."
        )
        if volumes:
            console.print(
                f"Whole-tumour volume {min(volumes):.1f}-{max(volumes):.1f} mL; labels in {out / 'labels.csv'}"
            )

    @sample_app.command("chest-ct")
    def chest_ct(
        out: Path = typer.Argument(
            ..., file_okay=False, dir_okay=True, writable=True, resolve_path=True,
            help="Output folder (created if missing).",
        ),
        cases: int = typer.Option(16, "--cases", min=1, help="Number of patients (one study each)."),
        seed: int = typer.Option(0, "--seed", min=0, help="Random seed; the same seed gives identical files."),
        matrix: int = typer.Option(160, "--matrix", min=16, max=1024, help="Rows and columns per slice."),
        min_thickness: float = typer.Option(1.25, "--min-thickness", min=0.5, max=10.0, help="Thinnest slices (mm)."),
        max_thickness: float = typer.Option(3.0, "--max-thickness", min=0.5, max=10.0, help="Thickest slices (mm)."),
        nodule_free_fraction: float = typer.Option(0.2, "--nodule-free-fraction", min=0.0, max=1.0,
                                                   help="Fraction of studies without nodules."),
        workers: int = typer.Option(1, "--workers", min=1, help="Processes generating studies at once."),
        force: bool = typer.Option(False, "--force", help="Regenerate even if OUT already holds this sample."),
    ) -> None:
        """Synthetic chest CT phantoms (CT as DICOM) with the organs as DICOM SEG and the lung nodules as DICOM SR
        (TID 1500 points) and nodules.csv."""
        from rich.console import Console

        from medpipe.cli.progress import RichProgress
        from medpipe.sample.chest_ct import ChestCtParams, existing_generation, generate_chest_ct

        console = Console()
        options = {"matrix": matrix, "min_thickness": min_thickness, "max_thickness": max_thickness,
                   "nodule_free_fraction": nodule_free_fraction}
        if not force and existing_generation(out, ChestCtParams(cases, seed, **options)) is not None:
            console.print(f"{out} already holds this sample ({cases} studies, seed {seed}); nothing to do "
                          "(use --force to regenerate).")
            return
        start = time.perf_counter()
        with RichProgress(console) as progress:
            progress.start("chest CT studies", cases)
            infos = generate_chest_ct(out, cases, seed, force=force, workers=workers,
                                      progress=lambda _info: progress.advance(), **options)
        elapsed = time.perf_counter() - start
        nodules = [n["diameter_mm"] for i in infos for n in i.nodules]
        size_mb = sum(f.stat().st_size for f in (out / "dicom").rglob("*.dcm")) / 1e6
        console.print(f"Wrote {len(infos)} studies ({sum(i.slices for i in infos)} CT images + {len(infos)} SEG + "
                      f"{len(infos)} SR, {size_mb:.0f} MB) to {out} in {elapsed:.1f} s; {len(nodules)} nodules"
                      + (f" of {min(nodules):.1f}-{max(nodules):.1f} mm" if nodules else "")
                      + f" in {sum(bool(i.nodules) for i in infos)} studies; truth in {out / 'nodules.csv'}.")

    app.add_typer(sample_app, name="sample")
