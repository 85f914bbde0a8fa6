"""Read what a run directory holds, for the HTML report: tolerant of missing and broken files.

Only files medpipe itself wrote are read (``resolved.yaml``, ``state.json``, ``metrics.json``,
``provenance.json``, ``run.log`` and the stages' CSV / PNG outputs), never DICOM headers: the report
carries no more patient information than those files. Every problem (a file missing, unreadable or
malformed) is recorded in :attr:`RunRecord.problems` instead of raised, so a failed or half-written run
still gets a report that says what is missing.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import ConfigError
from medpipe.stage import from_run_path

#: stage status as the runner records it, plus ``not run`` for stages of the pipeline without a record
STATUSES = ("done", "failed", "interrupted", "running", "not run")

#: run status: every stage done / a stage failed / one was interrupted (Ctrl-C) / a stage was running or some
#: never ran / no record
RUN_STATUSES = ("complete", "failed", "interrupted", "incomplete", "unknown")

#: artifact paths inside the run folder are stored as ``run:<relative path>`` (relocatable run folders)

_KEY = re.compile(r"^(\d+)_(.+)$")


@dataclass
class StageRecord:
    """One stage of a run: what the pipeline asked for and what the runner recorded."""

    key: str  # "03_train_segmenter"
    index: int
    kind: str
    folder: Path
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "not run"
    error: str | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    path: Path
    name: str
    resolved: dict[str, Any] | None
    resolved_text: str | None
    state: dict[str, Any] | None
    metrics: dict[str, Any] | None
    provenance: dict[str, Any] | None
    stages: list[StageRecord]
    problems: list[str]

    @property
    def status(self) -> str:
        """One of :data:`RUN_STATUSES`."""
        if self.state is None:
            return "unknown"
        statuses = [s.status for s in self.stages]
        if "failed" in statuses:
            return "failed"
        if "interrupted" in statuses:
            return "interrupted"
        if statuses and all(s == "done" for s in statuses):
            return "complete"
        return "incomplete"

    @property
    def failed_stage(self) -> StageRecord | None:
        return next((s for s in self.stages if s.status == "failed"), None)

    @property
    def interrupted_stage(self) -> StageRecord | None:
        return next((s for s in self.stages if s.status == "interrupted"), None)

    @property
    def running_stage(self) -> StageRecord | None:
        return next((s for s in self.stages if s.status == "running"), None)

    def log_lines(self) -> list[str]:
        """``run.log``'s lines ([] when it is missing or unreadable)."""
        try:
            return (self.path / "run.log").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("state.json", "resolved.yaml"))


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} cannot be read ({type(exc).__name__}: {exc})")
        return None


def _read_yaml(path: Path, problems: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    import yaml

    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problems.append(f"{path.name} cannot be read ({type(exc).__name__})")
        return None, None
    if not isinstance(doc, dict):
        problems.append(f"{path.name} does not hold a pipeline")
        return None, text
    return doc, text


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def read_run(path: Path) -> RunRecord:
    """Everything the report needs from a run directory; problems are recorded, not raised.

    Raises:
        ConfigError: ``path`` is not a run directory at all (neither ``state.json`` nor ``resolved.yaml``).
    """
    path = Path(path)
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not a medpipe run directory (no state.json or resolved.yaml)",
                          hint="give the folder `medpipe run` wrote (its --out, default runs/<pipeline name>)")
    problems: list[str] = []
    resolved, resolved_text = _read_yaml(path / "resolved.yaml", problems)
    state = _read_json(path / "state.json", problems)
    if state is not None and not isinstance(state, dict):
        problems.append("state.json does not hold a run state")
        state = None
    metrics = _read_json(path / "metrics.json", problems)
    metrics = metrics if isinstance(metrics, dict) else None
    provenance = _read_json(path / "provenance.json", problems)
    provenance = provenance if isinstance(provenance, dict) else None
    name = str((resolved or {}).get("name") or (state or {}).get("pipeline") or path.name)

    stages: dict[str, StageRecord] = {}
    for i, entry in enumerate((resolved or {}).get("stages") or []):
        if not isinstance(entry, dict):
            continue
        kind = str(entry.get("stage", "?"))
        key = f"{i:02d}_{kind}"
        stages[key] = StageRecord(key, i, kind, path / "stages" / key,
                                  params={k: v for k, v in entry.items() if k != "stage"})
    recorded = _dict((state or {}).get("stages"))
    per_stage_metrics = _dict((metrics or {}).get("stages"))
    folders = sorted(p.name for p in (path / "stages").iterdir() if p.is_dir()) if (path / "stages").is_dir() else []
    for key in [*recorded, *per_stage_metrics, *folders]:
        if key in stages:
            continue
        m = _KEY.match(key)
        if m is None:
            continue
        stages[key] = StageRecord(key, int(m.group(1)), m.group(2), path / "stages" / key)
    for key, rec in stages.items():
        entry = _dict(recorded.get(key))
        if entry:
            rec.status = str(entry.get("status") or "not run")
            rec.error = entry.get("error")
            seconds = entry.get("seconds")
            rec.seconds = float(seconds) if isinstance(seconds, (int, float)) else None
            rec.metrics = _dict(entry.get("metrics")) or _dict(per_stage_metrics.get(key))
            rec.outputs = {k: from_run_path(v, path) for k, v in _dict(entry.get("outputs")).items()}
        elif key in per_stage_metrics:
            rec.metrics = _dict(per_stage_metrics[key])
    ordered = sorted(stages.values(), key=lambda s: (s.index, s.key))
    return RunRecord(path, name, resolved, resolved_text, state, metrics, provenance, ordered, problems)


@dataclass
class CsvTable:
    header: list[str]
    rows: list[list[str]]
    total: int  # rows in the file (more than ``rows`` when cut at ``max_rows``)


def read_csv(path: Path, max_rows: int | None = None) -> CsvTable:
    """A CSV file medpipe wrote (header line first); raises OSError / csv.Error / UnicodeDecodeError."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows: list[list[str]] = []
        total = 0
        for row in reader:
            total += 1
            if max_rows is None or len(rows) < max_rows:
                rows.append(row)
    return CsvTable(header, rows, total)


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: doc}
