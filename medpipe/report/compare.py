"""Several runs side by side on one self-contained page: ``medpipe report RUN RUN [...] --out FILE``.

The page shows each run's status and provenance, the parameters in which the runs differ (from their
``resolved.yaml``, stage by stage), every metric of every run in one sortable table (values with their
95 % confidence intervals), and the runs' figures (training curves, ROC, calibration, ...) next to each
other, stage by stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medpipe.errors import ConfigError
from medpipe.io import write_text_atomic
from medpipe.report import html_parts as h
from medpipe.report.run_dir import RunRecord, flatten, read_run

#: figures compared side by side, per stage: (file name, what it is)
FIGURES = (
    ("curve.png", "training curve"),
    ("roc.png", "ROC"),
    ("calibration.png", "calibration"),
    ("confusion.png", "confusion matrix"),
    ("samples.png", "GAN samples"),
)


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    """Short unique names: the run folders' names, with their parents where two are alike."""
    names = [r.path.name for r in runs]
    if len(set(names)) == len(names):
        return names
    longer = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    if len(set(longer)) == len(longer):
        return longer
    return [f"{i + 1}: {n}" for i, n in enumerate(names)]


def _parameters(run: RunRecord) -> dict[str, Any]:
    """The resolved pipeline flattened, stages keyed like their folders (``03_train_segmenter.epochs``)."""
    doc = dict(run.resolved or {})
    stages = doc.pop("stages", None) or []
    out = flatten(doc)
    for i, st in enumerate(stages):
        if isinstance(st, dict):
            key = f"{i:02d}_{st.get('stage', '?')}"
            out.update(flatten({k: v for k, v in st.items() if k != "stage"}, key))
    return out


_MISSING = object()


def _differences(runs: Sequence[RunRecord], labels: list[str]) -> str:
    params = [_parameters(r) for r in runs]
    keys: list[str] = []
    for p in params:
        keys += [k for k in p if k not in keys]
    differing = [k for k in keys if len({repr(p.get(k, _MISSING)) for p in params}) > 1]
    if not differing:
        return h.note(f"The runs' {len(keys)} parameters are identical.")
    rows = []
    for k in differing:
        rows.append([k, *[h.Cell(h.fmt(p[k]) if k in p else "(absent)", cls="diff") for p in params]])
    return (h.note(f"{len(differing)} of {len(keys)} parameters differ (absent: the run's pipeline has no such "
                   "stage or parameter).")
            + h.table(["parameter", *labels], rows))


def _metric_value(metrics: dict[str, Any], name: str) -> tuple[str, Any]:
    if name not in metrics:
        return "", None
    value = metrics[name]
    ci = metrics.get(f"{name}_ci95")
    text = h.fmt(value) + (f" ({h.fmt_ci(ci)})" if ci is not None else "")
    sort = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return text, sort


def _metrics(runs: Sequence[RunRecord], labels: list[str]) -> str:
    per_run = [{f"{s.key}.{k}": v for s in r.stages for k, v in flatten(s.metrics).items()} for r in runs]
    names: list[str] = []
    for m in per_run:
        names += [k for k in m if k not in names and not (k.endswith("_ci95") and k[:-5] in m)]
    if not names:
        return h.note("No run recorded a metric.")

    def rows(selected: list[str]) -> list[list[Any]]:
        out = []
        for name in selected:
            cells: list[Any] = [name]
            for m in per_run:
                text, sort = _metric_value(m, name)
                cells.append(h.Cell(text, sort=sort, cls="num", wrap=True))
            out.append(cells)
        return out

    with_ci = [n for n in names if any(f"{n}_ci95" in m for m in per_run)]
    header = ["stage.metric", *labels]
    out = h.note("Value (95% CI) of each metric, per stage; click a run's column to rank the runs' values.")
    if with_ci:
        out += h.table(header, rows(with_ci), caption="With 95% confidence intervals (bootstrap over cases)")
    return out + h.details(f"every metric ({len(names)})", h.table(header, rows(names)), open_=not with_ci)


def _runs_table(runs: Sequence[RunRecord], labels: list[str]) -> str:
    rows = []
    for label, r in zip(labels, runs, strict=True):
        prov = r.provenance or {}
        rows.append([label, h.Cell(str(r.path), wrap=True), r.name, h.status_cell(r.status),
                     prov.get("started", ""), prov.get("finished", ""), (prov.get("git_commit") or "")[:12],
                     (r.resolved or {}).get("seed", prov.get("seed", "")), prov.get("device", ""),
                     (prov.get("versions") or {}).get("medpipe", "")])
    return h.table(["run", "directory", "pipeline", "status", "started", "finished", "git commit", "seed", "device",
                    "medpipe"], rows)


def _figures(runs: Sequence[RunRecord], labels: list[str], images: h.Images) -> str:
    keys: list[str] = []
    for r in runs:
        keys += [s.key for s in r.stages if s.key not in keys]
    out = []
    for key in keys:
        for name, what in FIGURES:
            paths = [r.path / "stages" / key / name for r in runs]
            if not any(p.is_file() for p in paths):
                continue
            cells = [images.figure(p, label, max_width=700) if p.is_file() else
                     f'<figure>{h.note(f"{label}: no {name}", cls="missing")}</figure>'
                     for p, label in zip(paths, labels, strict=True)]
            out.append(f"<h4>{h.esc(key)}: {h.esc(what)}</h4>"
                       f'<div class="compare" style="grid-template-columns: repeat({len(runs)}, minmax(0, 1fr))">'
                       f'{"".join(cells)}</div>')
    return "".join(out) or h.note("No figure to compare.")


def comparison_html(run_dirs: Sequence[Path], *, image_budget: int = h.DEFAULT_IMAGE_BUDGET) -> str:
    """The comparison page of the runs in ``run_dirs`` (two or more).

    Raises:
        ConfigError: fewer than two runs, or a folder that is not a run directory.
    """
    if len(run_dirs) < 2:
        raise ConfigError("a comparison needs at least two run directories")
    runs = [read_run(Path(d)) for d in run_dirs]
    labels = _labels(runs)
    images = h.Images(budget=image_budget)
    sections = [
        ("runs", "Runs", _runs_table(runs, labels)),
        ("parameters", "Parameters that differ", _differences(runs, labels)),
        ("metrics", "Metrics", _metrics(runs, labels)),
        ("figures", "Figures side by side", _figures(runs, labels, images)),
    ]
    problems = [f"{label}: {p}" for label, r in zip(labels, runs, strict=True) for p in r.problems]
    if problems:
        sections.append(("problems", "Problems", "<ul>" + "".join(f"<li>{h.esc(p)}</li>" for p in problems)
                         + "</ul>"))
    body = "".join(h.section(a, label, html) for a, label, html in sections)
    header = f"<h1>medpipe: {len(runs)} runs compared</h1>" + h.facts((label, str(r.path))
                                                                     for label, r in zip(labels, runs, strict=True))
    footer = (f"Written by medpipe; {images.embedded} images embedded ({images.used / 1e6:.1f} MB). Self-contained: "
              "opening it contacts no server.")
    return h.page(f"medpipe: {', '.join(labels)}", header, [(a, label) for a, label, _ in sections], body, footer)


def write_comparison(run_dirs: Sequence[Path], out: Path, *, image_budget: int = h.DEFAULT_IMAGE_BUDGET) -> Path:
    """Write :func:`comparison_html` to ``out`` atomically; return ``out``."""
    write_text_atomic(out, comparison_html(run_dirs, image_budget=image_budget))
    return Path(out)
