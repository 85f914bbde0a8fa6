"""The QA part of a report for an ingest folder: series with status and reasons, previews, rejected files.

Reads ``manifest.csv``, ``rejected.csv`` and the preview PNGs beside the volumes, all written by
:mod:`medpipe.ingest` (the manifest and the sidecars hold no names or birth dates); never a DICOM file.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

from medpipe.report.html_parts import Cell, Images, details, esc, note, status_cell, table
from medpipe.report.run_dir import read_csv

#: manifest columns shown in the series table, in order
SERIES_COLUMNS = ("patient_id", "modality", "series_number", "series_description", "part", "n_files", "shape",
                  "spacing", "status", "reasons")
_NUMERIC = {"series_number", "n_files"}
#: order of the previews: the series that need a look first
_SEVERITY = {"rejected": 0, "warning": 1, "ok": 2}
#: paths listed per rejection reason (the rest are counted), reasons listed, series rows in the table
PATHS_PER_REASON = 50
MAX_REASONS = 100
MAX_SERIES_ROWS = 2000

_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_ALSO_IN = re.compile(r"\(also in [^)]*\)")


def reason_group(reason: str) -> str:
    """A rejection reason without its specifics (UIDs, the other file's path), for grouping."""
    return _ALSO_IN.sub("(also in another file)", _UID.sub("<UID>", reason)).strip()


def ingest_qa_html(folder: Path, images: Images, *, max_previews: int = 80, preview_width: int = 480) -> str:
    """The QA block of one ingest output folder; notes instead of errors for missing or broken files."""
    out: list[str] = []
    manifest = folder / "manifest.csv"
    rows: list[dict[str, str]] = []
    if not manifest.is_file():
        out.append(note(f"{manifest}: not found (the ingest did not finish)", cls="missing"))
    else:
        try:
            t = read_csv(manifest)
            rows = [dict(zip(t.header, r, strict=False)) for r in t.rows]
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            out.append(note(f"{manifest}: cannot be read ({type(exc).__name__})", cls="missing"))
    if rows:
        counts = Counter(r.get("status", "") for r in rows)
        out.append(note(f"{len(rows)} series: " + ", ".join(f"{counts[s]} {s}" for s in sorted(counts,
                   key=lambda s: _SEVERITY.get(s, 3)))))
        body = []
        for r in rows[:MAX_SERIES_ROWS]:
            cells: list[object] = []
            for c in SERIES_COLUMNS:
                v = r.get(c, "")
                if c == "status":
                    cells.append(status_cell(v))
                elif c in _NUMERIC:
                    cells.append(Cell(v, cls="num"))
                else:
                    cells.append(v)
            body.append(cells)
        cut = (f"the first {MAX_SERIES_ROWS} of {len(rows)} series; all are in {manifest}"
               if len(rows) > MAX_SERIES_ROWS else None)
        out.append(table(list(SERIES_COLUMNS), body, caption="Series (one row per volume written or refused)",
                         note=cut))
        out.append(_previews(folder, rows, images, max_previews, preview_width))
    out.append(_rejected(folder / "rejected.csv"))
    return "".join(out)


def _previews(folder: Path, rows: list[dict[str, str]], images: Images, limit: int, width: int) -> str:
    with_preview = [r for r in rows if r.get("preview")]
    if not with_preview:
        return note("No previews (the manifest names none).")
    ordered = sorted(with_preview, key=lambda r: _SEVERITY.get(r.get("status", ""), 3))
    shown = ordered[:limit]
    figs = []
    for r in shown:
        status = r.get("status", "")
        caption = (f"{r.get('patient_id', '')} · #{r.get('series_number', '')} {r.get('series_description', '')}"
                   + (f" [{r['part']}]" if r.get("part") else "") + f" · {status}"
                   + (f": {r['reasons']}" if r.get("reasons") else ""))
        figs.append(images.figure(folder / r["preview"], caption, max_width=width, photo=True))
    more = (note(f"{len(ordered) - len(shown)} more previews (status ok) beside the volumes in {folder / 'volumes'}")
            if len(ordered) > len(shown) else "")
    explain = note("Middle axial, coronal and sagittal slices, radiological convention (the patient's right on "
                   "the left); series with warnings or rejected first.")
    problems = sum(1 for r in with_preview if r.get("status") != "ok")
    return details(f"Previews of {len(shown)} series" + (f" ({problems} with warnings or rejected)" if problems else ""),
                   explain + f'<div class="gallery">{"".join(figs)}</div>' + more, open_=problems > 0)


def _rejected(path: Path) -> str:
    if not path.is_file():
        return note(f"{path}: not found", cls="missing")
    try:
        t = read_csv(path)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        return note(f"{path}: cannot be read ({type(exc).__name__})", cls="missing")
    if not t.rows:
        return "<h4>Rejected files</h4>" + note("No file was rejected: every file is in a volume.")
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in t.rows:
        file, reason = (row + ["", ""])[:2]
        groups[reason_group(reason)].append((file, reason))
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    cut = (f"the {MAX_REASONS} most frequent of {len(ordered)} reasons; all files are in {path}"
           if len(ordered) > MAX_REASONS else None)
    ordered = ordered[:MAX_REASONS]
    summary = table(["reason", "files"], [[Cell(g, wrap=True), Cell(len(files), cls="num")] for g, files in ordered],
                    caption=f"Rejected files by reason ({t.total} files)", note=cut)
    lists = []
    for g, files in ordered:
        items = "".join(f"<li><code>{esc(f)}</code>" + (f" ({esc(r)})" if r != g else "") + "</li>"
                        for f, r in files[:PATHS_PER_REASON])
        rest = f"<li>… and {len(files) - PATHS_PER_REASON} more</li>" if len(files) > PATHS_PER_REASON else ""
        lists.append(details(f"{g}: {len(files)} file(s)", f"<ul>{items}{rest}</ul>"))
    return "<h4>Rejected files</h4>" + summary + "".join(lists)
