"""``report.html``: one self-contained page per run, for a researcher or a clinician to open in a browser.

What it shows, all read from the run directory (:mod:`medpipe.report.run_dir`): the run's status (a
failed or interrupted run says where it stopped and why), every stage with its status, time, parameters
and metrics, the metrics with their 95 % confidence intervals in one sortable table, each stage's pictures
(training curves, GAN samples, ROC / confusion / calibration, evaluation overlays, Grad-CAM montages, the
SEG previews of scored studies), its per-case tables (sortable by clicking a column header), a QA page for
each ingest (series with status and reasons, previews, rejected files grouped by reason), the resolved
pipeline, the provenance and the log's warnings and errors.

The file has no external reference (see :mod:`medpipe.report.html_parts`): it can be mailed or archived
alone. Images are downscaled and the page's images kept within a budget (the ``brain_tumor.yaml`` run
gives a report of 2.5 MB). Missing or unreadable files become notes in the page, never errors.

The runner writes it at the end of every run (:func:`write_report_quietly`: a report that cannot be
written logs a warning and never fails the run); ``medpipe report RUN`` rebuilds it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medpipe.errors import ConfigError
from medpipe.io import write_text_atomic
from medpipe.report import html_parts as h
from medpipe.report.html_ingest import ingest_qa_html
from medpipe.report.run_dir import RunRecord, StageRecord, flatten, is_run_dir, read_csv, read_run

log = logging.getLogger("medpipe.report")

REPORT_NAME = "report.html"
#: rows of a per-case table put in the page (the CSV beside it has them all)
MAX_TABLE_ROWS = 1000
#: log lines (warnings and errors) put in the page
MAX_LOG_LINES = 200


@dataclass(frozen=True)
class Picture:
    """Pictures a stage leaves in its folder: ``pattern`` (a glob), shown up to ``limit``."""

    pattern: str
    caption: str
    limit: int = 1
    width: int = 900
    photo: bool = False
    gallery: str = ""  # the gallery's CSS class: "" (medium), "small" or "wide"


#: single figures, then galleries, in the order shown (any stage kind: what is there is shown)
PICTURES = (
    Picture("curve.png", "Training curve: loss per epoch and the validation metric"),
    Picture("samples.png", "GAN samples: real training images above generated ones, per class"),
    Picture("roc.png", "ROC curve with the AUC and its 95% CI"),
    Picture("confusion.png", "Confusion matrix (rows: truth, columns: prediction)"),
    Picture("calibration.png", "Calibration: reliability diagram and ECE"),
    Picture("per_label.png", "Per class (organ): Dice and HD95 with their bootstrap 95% CIs"),
    Picture("overlays/*.png", "Evaluation overlays: truth outlined in sky blue (solid), prediction in orange "
            "(dashed), on the slice with most tumour", limit=12, width=800),
    Picture("*_explain.png", "Explanations (Grad-CAM, Grad-CAM++, occlusion) of the cases chosen", limit=12,
            width=1000, gallery="wide"),
    Picture("results/*/*/preview.png", "Scored studies: each DICOM SEG read back from its file, over the source "
            "frames", limit=12, width=900, photo=True, gallery="wide"),
    Picture("synthetic/*.png", "Synthetic training images added by the GAN (first ones)", limit=24, width=128,
            gallery="small"),
)

#: per-case and per-epoch tables: (file, caption, shown open)
TABLES = (
    ("cases.csv", "Per-case results", True),
    ("per_label.csv", "Per-class (organ) results", True),
    ("predictions.csv", "Per-case predictions", True),
    ("scores.csv", "Scored studies", True),
    ("explanations.csv", "Cases explained", True),
    ("history.csv", "Training history (per epoch)", False),
)


def _caption_map(stage: StageRecord) -> Callable[[Path], str]:
    """Captions of a stage's gallery pictures, from the stage's own CSV where it names the picture."""
    by_path: dict[str, str] = {}
    try:
        if (stage.folder / "explanations.csv").is_file():
            t = read_csv(stage.folder / "explanations.csv")
            for r in (dict(zip(t.header, row, strict=False)) for row in t.rows):
                prob = r.get("probability", "")
                by_path[r.get("file", "")] = (f"{r.get('case', '')}: true {r.get('true', '')}, predicted "
                                              f"{r.get('predicted', '')}" + (f" (p = {prob})" if prob else ""))
        if (stage.folder / "scores.csv").is_file():
            t = read_csv(stage.folder / "scores.csv")
            for r in (dict(zip(t.header, row, strict=False)) for row in t.rows):
                volumes = ", ".join(f"{k[:-3].replace('_', ' ')} {v} mL" for k, v in r.items()
                                    if k.endswith("_ml") and v)
                by_path[r.get("preview", "")] = " · ".join(x for x in (r.get("patient_id", ""), r.get("status", ""),
                                                                       volumes) if x)
    except (OSError, csv.Error, UnicodeDecodeError):
        pass  # the tables themselves say so below

    def caption(path: Path) -> str:
        rel = path.relative_to(stage.folder).as_posix()
        return by_path.get(rel) or by_path.get(path.name) or rel

    return caption


def _pictures(stage: StageRecord, images: h.Images) -> str:
    singles: list[str] = []
    out: list[str] = []
    caption_of = _caption_map(stage)
    for pic in PICTURES:
        found = sorted(stage.folder.glob(pic.pattern))
        if not found:
            continue
        if pic.limit == 1 and "*" not in pic.pattern:
            singles.append(images.figure(found[0], pic.caption, max_width=pic.width, photo=pic.photo))
            continue
        figs = [images.figure(p, caption_of(p), max_width=pic.width, photo=pic.photo) for p in found[:pic.limit]]
        more = (h.note(f"{len(found) - pic.limit} more in {stage.folder / Path(pic.pattern).parent}")
                if len(found) > pic.limit else "")
        out.append(f"<h4>{h.esc(pic.caption)} ({len(found)})</h4>"
                   f'<div class="gallery {pic.gallery}">{"".join(figs)}</div>{more}')
    figures = f'<div class="gallery figures">{"".join(singles)}</div>' if singles else ""
    return figures + "".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() != ""


def csv_table_html(path: Path, caption: str, *, open_: bool = True, max_rows: int = MAX_TABLE_ROWS) -> str:
    """A CSV file medpipe wrote as a sortable table (numbers right-aligned), inside a ``<details>``."""
    try:
        t = read_csv(path, max_rows)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        return h.note(f"{path.name}: cannot be read ({type(exc).__name__})", cls="missing")
    rows = [[h.Cell(v, cls="num") if _is_number(v) else v for v in row] for row in t.rows]
    cut = f"the first {len(t.rows)} of {t.total} rows; all are in {path}" if t.total > len(t.rows) else ""
    body = h.table(t.header, rows, note=cut or None)
    return h.details(f"{caption}: {path.name} ({t.total} rows)", body, open_=open_)


def _ingest_folders(stage: StageRecord) -> list[tuple[Path, str]]:
    """Ingest output folders a stage made: the ingest stage's ``ingest_dir``, the score stage's ``ingest/``."""
    if stage.kind == "ingest" and stage.status != "not run":
        folder = stage.outputs.get("ingest_dir") or stage.params.get("out") or stage.folder
        return [(Path(str(folder)), "Ingest QA")]  # also when it is missing: the QA section says so
    if (stage.folder / "ingest" / "manifest.csv").is_file():
        return [(stage.folder / "ingest", "Ingest QA of the scored export")]
    return []


def _metric_rows(metrics: dict[str, Any], *, with_ci_only: bool = False) -> list[list[Any]]:
    """``[metric, value, CI]`` rows: ``*_ci95`` keys go beside their metric; nested dicts flattened."""
    flat = flatten(metrics)
    rows = []
    for name, value in flat.items():
        if name.endswith("_ci95") and name[:-5] in flat:
            continue
        ci = flat.get(f"{name}_ci95")
        if with_ci_only and ci is None:
            continue
        sort = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        rows.append([name, h.Cell(h.fmt(value), sort=sort, cls="num" if sort is not None else None),
                     h.fmt_ci(ci) if ci is not None else ""])
    return rows


def _metrics_section(run: RunRecord) -> str:
    with_ci = [[s.key, *row] for s in run.stages for row in _metric_rows(s.metrics, with_ci_only=True)]
    every = [[s.key, *row] for s in run.stages for row in _metric_rows(s.metrics)]
    if not every:
        return h.note("No metrics recorded.")
    header = ["stage", "metric", "value", "95% CI"]
    out = []
    if with_ci:
        out.append(h.table(header, with_ci, caption="With 95% confidence intervals (bootstrap over cases)"))
    out.append(h.details(f"every metric of every stage ({len(every)})", h.table(header, every), open_=not with_ci))
    return "".join(out)


def _key_metrics(metrics: dict[str, Any], n: int = 4) -> str:
    shown = []
    for k, v in metrics.items():
        if k.endswith("_ci95") or isinstance(v, (dict, list, str)):
            continue
        ci = metrics.get(f"{k}_ci95")
        shown.append(f"{k} {h.fmt(v)}" + (f" ({h.fmt_ci(ci)})" if ci is not None else ""))
        if len(shown) == n:
            break
    return "; ".join(shown)


def _status_banner(run: RunRecord) -> str:
    status = run.status
    if status == "failed":
        st = run.failed_stage
        if st is None:  # cannot happen: status is "failed" because a stage failed
            return ""
        why = st.error or "no message recorded: see the log below"
        later = sum(1 for s in run.stages if s.index > st.index)
        return (f'<div class="banner failed"><strong>The run failed</strong> at stage {h.esc(st.key)}: {h.esc(why)}'
                + (f" ({later} later stage(s) did not run.)" if later else "") + "</div>")
    if status == "interrupted":
        st = run.interrupted_stage
        name = st.key if st is not None else "?"
        return ('<div class="banner incomplete"><strong>The run was interrupted</strong> (Ctrl-C) in stage '
                f"{h.esc(name)}; what finished is kept, and running the same command with --resume continues "
                "it.</div>")
    if status == "incomplete":
        st = run.running_stage
        if st is not None:
            text = (f"Stage {h.esc(st.key)} was running when this report was written: the run was killed, "
                    "or is still running.")
        else:
            text = f"{sum(1 for s in run.stages if s.status == 'not run')} stage(s) have not run."
        return f'<div class="banner incomplete"><strong>The run is incomplete.</strong> {text}</div>'
    if status == "unknown":
        return ('<div class="banner incomplete"><strong>No run state</strong> (state.json missing or unreadable): '
                "the stages' status is unknown.</div>")
    return ""


def _header(run: RunRecord) -> str:
    prov = run.provenance or {}
    versions = prov.get("versions") or {}
    pairs = [
        ("run directory", str(run.path)),
        ("pipeline file", prov.get("pipeline", "")),
        ("started", prov.get("started", "")),
        ("finished", prov.get("finished", "") or "(not recorded: the run did not finish)"),
        ("device", prov.get("device", "")),
        ("seed", (run.resolved or {}).get("seed", prov.get("seed", ""))),
        ("medpipe", f"{versions.get('medpipe', '?')}, git commit {prov.get('git_commit') or 'unknown'}"),
    ]
    pairs = [(k, v) for k, v in pairs if v not in ("", None)]
    badge = h.status_cell(run.status).html
    return (f"<h1>{h.esc(run.name)}: medpipe run report {badge}</h1>"
            + (f'<p class="note">{h.esc(run.resolved.get("description"))}</p>'
               if run.resolved and run.resolved.get("description") else "")
            + h.facts(pairs))


def _stages_table(run: RunRecord) -> str:
    rows = []
    for s in run.stages:
        rows.append([h.Cell(html=f'<a href="#{h.anchor_id("stage-" + s.key)}">{h.esc(s.key)}</a>', sort=s.key),
                     s.kind, h.status_cell(s.status),
                     h.Cell(h.fmt(s.seconds) if s.seconds is not None else "", sort=s.seconds, cls="num"),
                     h.Cell(_key_metrics(s.metrics), wrap=True), h.Cell(s.error or "", wrap=True)])
    if not rows:
        return h.note("No stage recorded.")
    header = ["stage", "kind", "status", "seconds", "key metrics (95% CI)", "error"]
    if not any(s.error for s in run.stages):
        header, rows = header[:-1], [r[:-1] for r in rows]
    return h.table(header, rows)


def _stage_section(run: RunRecord, s: StageRecord, images: h.Images) -> str:
    body: list[str] = []
    line = f"{h.status_cell(s.status).html}"
    if s.seconds is not None:
        line += f" in {s.seconds:.1f} s"
    body.append(f"<p>{line}</p>")
    if s.status == "failed":
        body.append(f'<div class="banner failed">{h.esc(s.error or "failed without a message: see the log")}</div>')
    if s.params:
        rows = [[k, h.fmt(v)] for k, v in flatten(s.params).items()]
        body.append(h.details(f"parameters ({len(rows)})", h.table(["parameter", "value"], rows)))
    if s.metrics:
        body.append(h.details(f"metrics ({len(flatten(s.metrics))})",
                              h.table(["metric", "value", "95% CI"], _metric_rows(s.metrics)), open_=True))
    if s.folder.is_dir():
        body.append(_pictures(s, images))
        for name, caption, open_ in TABLES:
            if (s.folder / name).is_file():
                body.append(csv_table_html(s.folder / name, caption, open_=open_))
    elif s.status != "not run":
        body.append(h.note(f"{s.folder}: no stage folder", cls="missing"))
    for folder, title in _ingest_folders(s):
        qa = ingest_qa_html(folder, images, max_previews=80 if s.kind == "ingest" else 12)
        body.append(h.section(h.anchor_id(f"qa-{s.key}"), f"{title}: {folder}", qa, level=4))
    return h.section(h.anchor_id(f"stage-{s.key}"), f"{s.key.replace('_', ' ', 1)}", "".join(body), level=3)


def _provenance(run: RunRecord) -> str:
    prov = run.provenance
    if prov is None:
        return h.note("provenance.json is missing: the runner writes it when the run finishes.", cls="missing")
    command = prov.get("command")
    pairs = [(k, prov.get(k)) for k in ("pipeline", "pipeline_sha256", "started", "finished", "seed", "deterministic",
                                        "device", "mixed_precision", "git_commit", "host") if k in prov]
    if command:
        pairs.insert(0, ("command", " ".join(str(c) for c in command) if isinstance(command, list) else command))
    out = [h.facts((k, h.fmt(v) if not isinstance(v, str) else v) for k, v in pairs)]
    versions = prov.get("versions") or {}
    if versions:
        out.append(h.table(["package", "version"], list(versions.items()), caption="Versions"))
    inputs = prov.get("inputs") or {}
    if inputs:
        out.append(h.details(f"input checksums ({len(inputs)})",
                             h.table(["file", "sha256"], list(inputs.items()))))
    return "".join(out)


def _log(run: RunRecord) -> str:
    lines = run.log_lines()
    if not lines:
        return h.note("run.log is missing or empty.", cls="missing")
    flagged = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln]
    out = []
    if flagged:
        shown = flagged[-MAX_LOG_LINES:]
        more = f" (the last {len(shown)} of {len(flagged)})" if len(flagged) > len(shown) else ""
        out.append(h.details(f"warnings and errors: {len(flagged)}{more}", h.pre("\n".join(shown)),
                             open_=run.status == "failed"))
    else:
        out.append(h.note("No warning or error in run.log."))
    if run.status != "complete":
        out.append(h.details("the end of run.log", h.pre("\n".join(lines[-60:])), open_=True))
    return "".join(out)


def run_report_html(run_dir: Path, *, image_budget: int = h.DEFAULT_IMAGE_BUDGET) -> str:
    """The report page of the run in ``run_dir`` (see the module docstring).

    Raises:
        ConfigError: ``run_dir`` is not a run directory.
    """
    run = read_run(Path(run_dir))
    images = h.Images(budget=image_budget)
    sections: list[tuple[str, str, str]] = []  # (anchor, nav label, html)
    summary = _status_banner(run) + _stages_table(run)
    sections.append(("summary", "Summary", summary))
    sections.append(("metrics", "Metrics", _metrics_section(run)))
    stage_html = "".join(_stage_section(run, s, images) for s in run.stages)
    sections.append(("stages", "Stages", stage_html or h.note("No stage recorded.")))
    pipeline = (h.details("resolved.yaml (every default filled in)", h.pre(run.resolved_text))
                if run.resolved_text else h.note("resolved.yaml is missing.", cls="missing"))
    sections.append(("pipeline", "Pipeline", pipeline))
    sections.append(("provenance", "Provenance", _provenance(run)))
    sections.append(("log", "Log", _log(run)))
    problems = list(run.problems)
    if images.left_out:
        problems.append(f"{len(images.left_out)} image(s) not embedded: the page's image budget is spent")
    if problems:
        sections.append(("problems", "Problems", "<ul>" + "".join(f"<li>{h.esc(p)}</li>" for p in problems)
                         + "</ul>"))
    body = "".join(h.section(a, label, html) for a, label, html in sections)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"Written by medpipe on {stamp} from {run.path}; {images.embedded} images embedded "
              f"({images.used / 1e6:.1f} MB). Self-contained: opening it contacts no server.")
    return h.page(f"{run.name}: medpipe report", _header(run), [(a, label) for a, label, _ in sections], body, footer)


def write_run_report(run_dir: Path, out: Path | None = None, *, image_budget: int = h.DEFAULT_IMAGE_BUDGET) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``), atomically; return its path."""
    target = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    write_text_atomic(target, run_report_html(Path(run_dir), image_budget=image_budget))
    return target


def ingest_report_html(folder: Path, *, image_budget: int = h.DEFAULT_IMAGE_BUDGET) -> str:
    """The QA page of a ``medpipe ingest`` output folder (one that holds ``manifest.csv``)."""
    folder = Path(folder)
    if not (folder / "manifest.csv").is_file():
        raise ConfigError(f"{folder} is not an ingest output folder (no manifest.csv)",
                          hint="give the --out folder of `medpipe ingest`")
    images = h.Images(budget=image_budget)
    body = h.section("qa", "Ingest QA", ingest_qa_html(folder, images))
    header = f"<h1>Ingest QA: {h.esc(folder.name)}</h1>" + h.facts([("folder", str(folder.resolve()))])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"Written by medpipe on {stamp}; {images.embedded} images embedded ({images.used / 1e6:.1f} MB). "
              "Self-contained: opening it contacts no server.")
    return h.page(f"{folder.name}: medpipe ingest QA", header, [("qa", "Ingest QA")], body, footer)


def write_report(path: Path, out: Path | None = None, *, image_budget: int = h.DEFAULT_IMAGE_BUDGET) -> Path:
    """The report of a run directory, or the QA page of an ingest output folder, to ``out``
    (default ``path/report.html``); return where it was written.

    Raises:
        ConfigError: ``path`` is neither.
    """
    path = Path(path)
    if not is_run_dir(path) and (path / "manifest.csv").is_file():
        target = Path(out) if out is not None else path / REPORT_NAME
        write_text_atomic(target, ingest_report_html(path, image_budget=image_budget))
        return target
    return write_run_report(path, out, image_budget=image_budget)


def write_report_quietly(run_dir: Path) -> Path | None:
    """For the runner: :func:`write_run_report`, logging a warning instead of raising (a report never fails a run)."""
    try:
        path = write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the run's own outcome stands
        log.warning("report.html not written: %s: %s", type(exc).__name__, exc)
        return None
    log.info("report: %s", path)
    return path
