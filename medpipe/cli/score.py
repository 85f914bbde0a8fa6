"""``medpipe score SRC --model MODEL --out DIR`` and ``medpipe export RUN_DIR --out MODEL_DIR``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def score_command(
    src: str = typer.Argument(..., help="DICOM folder / .zip / DICOMDIR, an ingest output folder, or a PACS query "
                                        "pacs://NODE?StudyDate=...&Modality=MR (pulled into OUT/pacs/NODE)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model package folder (a run's stages/NN_train_*/model, "
                                                          "or one made by `medpipe export`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results/, scores.csv, ingest/."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    explain: bool = typer.Option(False, "--explain", help="Also a saliency / probability map as DICOM Parametric "
                                                          "Map and an RGB Secondary Capture overlay."),
    nifti: bool = typer.Option(False, "--nifti", help="Also the mask (or map) as NIfTI on the ingest grid."),
    seg_type: str = typer.Option("binary", "--seg-type", help="binary (default) or labelmap (Label Map "
                                                              "Segmentation; some PACS refuse its SOP class)."),
    tta: bool = typer.Option(None, "--tta/--no-tta", help="Flip test-time augmentation (default: the model's)."),
    readers: int = typer.Option(1, "--readers", min=1, max=16, help="Threads reading studies ahead."),
    writers: int = typer.Option(1, "--writers", min=1, max=16, help="Threads writing results."),
    cpu_threads: int = typer.Option(None, "--cpu-threads", min=1, max=1024, help="torch CPU threads (per Dask "
                                                                                 "worker with --dask)."),
    dask: str = typer.Option(None, "--dask", help="Score on Dask workers, one task per study, the model loaded once "
                                                  "per worker: local:N (N worker processes here) or tcp://HOST:PORT "
                                                  "(a running scheduler; workers must see SRC, MODEL and OUT). Needs "
                                                  "pip install 'medpipe[dask]'."),
    resume: bool = typer.Option(False, "--resume", help="Accepted for symmetry with `run`: every run resumes "
                                                        "(studies scored with the same model and inputs are skipped)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    push: str = typer.Option(None, "--push", help="Send the SEG / SR (/ maps) of the studies scored ok to this PACS "
                                                  "node (only what was not sent before)."),
    push_via: str = typer.Option(None, "--push-via", help="dimse (C-STORE) or dicomweb (STOW-RS)."),
    pacs: Path = typer.Option(None, "--pacs", help="PACS node file for pacs:// sources and --push."),
) -> None:
    """Score every study of a DICOM export with a trained model: DICOM SEG / SR (and maps) plus scores.csv."""
    from medpipe.cli.progress import RichProgress, bar_factory
    from medpipe.errors import ConfigError
    from medpipe.scoring.engine import ScoreOptions, score

    if seg_type not in ("binary", "labelmap"):
        raise ConfigError(f"--seg-type {seg_type}: expected binary or labelmap")
    if push_via not in (None, "dimse", "dicomweb"):
        raise ConfigError(f"--push-via {push_via}: expected dimse or dicomweb")
    if dask is not None:
        from medpipe.scoring.dask import parse_spec

        parse_spec(dask)  # a wrong spec fails before anything is ingested
    source = _pacs_source(src, out, pacs, quiet) if src.lower().startswith("pacs://") else Path(src)
    options = ScoreOptions(device=device, tta=tta, explain=explain, nifti=nifti, seg_type=seg_type,  # type: ignore[arg-type]
                           readers=readers, writers=writers, cpu_threads=cpu_threads, dask=dask)
    console = Console(quiet=quiet)
    with RichProgress(console) as ingest_progress:
        report = score(source, model, out, options, progress=bar_factory(ingest_progress),
                       ingest_progress=ingest_progress)
    if push:
        _push_results(push, push_via, pacs, report, console)
    if quiet:
        return
    table = Table(title=f"Scores in {escape(str(report.out))}")
    for col in ("patient", "study", "status", "result", "seconds"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "skipped": "yellow", "failed": "red"}
    for row in report.rows[:40]:
        result = row.get("reason") or ", ".join(f"{k}={row[k]}" for k in row if k.endswith(("_ml", "_probability"))
                                                or k == "decision")
        table.add_row(escape(str(row["patient_id"])), escape(str(row["study_uid"])[-24:]),
                      f"[{style.get(row['status'], '')}]{row['status']}[/]", escape(str(result))[:120],
                      f"{float(row.get('seconds') or 0):.1f}")
    console.print(table)
    counts = report.counts
    secs = report.seconds
    parts = ", ".join(f"{k} {secs[k]:.1f} s" for k in ("read", "preprocess", "infer", "write") if k in secs)
    console.print(f"{len(report.rows)} studies: {counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, "
                  f"{counts.get('failed', 0)} failed ({report.n_reused} already scored); wall {secs['wall']:.1f} s"
                  + (f" ({parts} summed over {'studies' if dask else 'threads'})" if parts else "")
                  + (f"; Dask cluster ready in {secs['start_cluster']:.1f} s" if "start_cluster" in secs else ""))
    console.print(f"model {report.model_id[:16]}; results in {escape(str(report.out / 'results'))}, "
                  f"table in {escape(str(report.out / 'scores.csv'))}")


def _pacs_source(url: str, out: Path, pacs: Path | None, quiet: bool) -> Path:
    from medpipe.pacs.source import pull_source

    folder, pulled = pull_source(url, out / "pacs", pacs)
    if not quiet:
        Console().print(f"pulled {pulled.received} new instance(s) ({pulled.already} already here) into "
                        f"{escape(str(folder))}")
    return folder


def _push_results(node_name: str, via: str | None, pacs: Path | None, report, console: Console) -> None:  # type: ignore[no-untyped-def]
    from medpipe.pacs.nodes import load_nodes
    from medpipe.pacs.push import push_scored

    node = load_nodes(pacs).get(node_name)
    pushed = push_scored(node, report.out, report.rows, via=via)  # type: ignore[arg-type]
    c = pushed.counts
    console.print(f"pushed to {escape(node.name)}: {c.get('ok', 0) + c.get('warning', 0)} file(s) stored, "
                  f"{len(pushed.failed)} failed (results sent before are not sent again)")
    pushed.raise_for_failures()


def export_command(
    run_dir: Path = typer.Argument(..., help="A run folder of `medpipe run` (or a model package folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the model package goes (a new or empty folder)."),
    stage: str = typer.Option(None, "--stage", help="Which training stage's model (e.g. 03_train_segmenter); "
                                                    "default: the only one, or the last."),
) -> None:
    """Copy a trained model out of a run as a self-contained package with its model card."""
    from medpipe.scoring.export import export_model

    pkg = export_model(run_dir, out, stage)
    Console().print(f"model {pkg.id[:16]} ({pkg.kind}) -> {escape(str(pkg.path))}; card: "
                    f"{escape(str(pkg.path / 'model_card.md'))}")


def register(app: typer.Typer) -> None:
    app.command("score")(score_command)
    app.command("export")(export_command)
