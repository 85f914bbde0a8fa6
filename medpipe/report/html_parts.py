"""Building blocks of medpipe's self-contained HTML pages: escaping, values, tables, images, the page.

A page has no external reference at all: images are ``data:`` URIs (downscaled and re-encoded to keep
the file small, within a byte budget per page), the CSS and the script are inline, and a
Content-Security-Policy forbids the browser to load anything else (so opening a report never contacts
a server). The script makes tables with class ``sortable`` sortable by clicking (or pressing Enter on)
a column header, shows a picture at full size when it is clicked, and marks the page (``data-images`` on
``<html>``: ``ok`` or ``broken N``) once every image has loaded, with a visible warning when one did not.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: total bytes of embedded images per page (a few MB: opens fast, mails as an attachment)
DEFAULT_IMAGE_BUDGET = 6_000_000


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any) -> str:
    """A metric or parameter value as text: floats with 4 significant digits, None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def fmt_ci(ci: Any) -> str:
    """A 95 % confidence interval ``[lo, hi]`` as text; ``undefined`` when a bound is missing."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    lo, hi = ci
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
        return "undefined"
    return f"{lo:.4g} – {hi:.4g}"


#: cells with more characters than this are shown on one line, cut with an ellipsis (whole on hover)
LONG_CELL = 36


@dataclass
class Cell:
    """A table cell: ``text`` shown (escaped), or ``html`` as is; ``sort`` the value sorting uses; ``cls`` a class.

    Text longer than :data:`LONG_CELL` is shown on one line, cut, whole on hover (unless ``wrap``).
    """

    text: Any = ""
    html: str | None = None
    sort: Any = None
    cls: str | None = None
    wrap: bool = False  # long text wraps instead of being cut

    def render(self) -> str:
        attrs = ""
        cls = self.cls or ""
        text = "" if self.text is None else str(self.text)
        if self.html is None and not self.wrap and len(text) > LONG_CELL:  # UIDs, paths: one line, cut, the whole value on hover
            cls = f"{cls} long".strip()
            attrs += f' title="{esc(text)}"'
        if self.sort is not None:
            attrs += f' data-sort="{esc(self.sort)}"'
        if cls:
            attrs += f' class="{esc(cls)}"'
        return f"<td{attrs}>{self.html if self.html is not None else esc(text)}</td>"


def status_cell(status: str, detail: str = "") -> Cell:
    """A status shown as a word (never by colour alone) on a coloured badge."""
    word = esc(status)
    return Cell(html=f'<span class="badge st-{esc(status.replace(" ", "-"))}">{word}</span>'
                + (f" {esc(detail)}" if detail else ""), sort=status)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, sortable: bool = True, caption: str | None = None,
          note: str | None = None, cls: str = "") -> str:
    """An HTML table; cells are :class:`Cell` or plain values (escaped). ``note``: a line under the table."""
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    out = [f'<div class="tablewrap"><table class="{classes}">']
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    hint = ' title="click to sort"' if sortable else ""
    ths = "".join(f'<th scope="col"{hint}' + (' tabindex="0"' if sortable else "") + f">{esc(h)}</th>"
                  for h in header)
    out.append(f"<thead><tr>{ths}</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join((c if isinstance(c, Cell) else Cell(c)).render() for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    if note:
        out.append(f'<p class="note">{esc(note)}</p>')
    return "".join(out)


def facts(pairs: Iterable[tuple[str, Any]]) -> str:
    """A definition list of ``(label, value)``; values are escaped."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs)
    return f'<dl class="facts">{items}</dl>'


def details(summary: str, body: str, *, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{body}</details>"


def note(text: str, *, cls: str = "note") -> str:
    return f'<p class="{esc(cls)}">{esc(text)}</p>'


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def section(anchor: str, title: str, body: str, *, level: int = 2) -> str:
    return f'<section id="{esc(anchor)}"><h{level}>{esc(title)}</h{level}>{body}</section>'


def anchor_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


# -- images --------------------------------------------------------------------------------------------


@dataclass
class Images:
    """Embeds PNGs as ``data:`` URIs within a byte budget per page.

    Each image is downscaled to ``max_width`` pixels and re-encoded as the smallest of: PNG, PNG with an
    adaptive 256-colour palette (figures: text and lines stay sharp), and, for ``photo`` images (previews
    of scans), JPEG at quality 85. Past the budget, images are named instead of embedded.
    """

    budget: int = DEFAULT_IMAGE_BUDGET
    used: int = 0
    embedded: int = 0
    left_out: list[str] = field(default_factory=list)

    def img(self, path: Path, alt: str, *, max_width: int = 900, photo: bool = False) -> str:
        """An ``<img>`` of ``path``, or a note saying why it is not shown (missing, unreadable, over budget)."""
        if not path.is_file():
            return note(f"{path.name}: not found", cls="missing")
        try:
            mime, data = encode_image(path, max_width, photo=photo)
        except (OSError, ValueError) as exc:  # PIL's errors for truncated / non-image files
            return note(f"{path.name}: cannot be read ({type(exc).__name__})", cls="missing")
        if self.used + len(data) > self.budget:
            self.left_out.append(str(path))
            return note(f"{path.name}: not embedded (the page's image budget of {self.budget / 1e6:.0f} MB is "
                        f"spent); see {path}", cls="missing")
        self.used += len(data)
        self.embedded += 1
        uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return f'<img src="{uri}" alt="{esc(alt)}">'

    def figure(self, path: Path, caption: str, *, max_width: int = 900, photo: bool = False, cls: str = "") -> str:
        img = self.img(path, caption, max_width=max_width, photo=photo)
        return f'<figure class="{esc(cls)}">{img}<figcaption>{esc(caption)}</figcaption></figure>'


def encode_image(path: Path, max_width: int, *, photo: bool = False) -> tuple[str, bytes]:
    """``(mime type, bytes)`` of the image at ``path``, at most ``max_width`` wide, smallest encoding wins."""
    from PIL import Image

    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        if im.mode not in ("L", "RGB"):
            background = Image.new("RGB", im.size, "white")
            rgba = im.convert("RGBA")
            background.paste(rgba, mask=rgba.getchannel("A"))
            im = background
        if im.width > max_width:
            im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.Resampling.LANCZOS)
        candidates: list[tuple[str, bytes]] = [("image/png", _save(im, "PNG", optimize=True))]
        if im.mode == "RGB":
            candidates.append(("image/png", _save(im.quantize(256), "PNG", optimize=True)))
        if photo:
            candidates.append(("image/jpeg", _save(im, "JPEG", quality=85)))
    return min(candidates, key=lambda c: len(c[1]))


def _save(im: Any, fmt_: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt_, **kwargs)
    return buf.getvalue()


# -- the page ------------------------------------------------------------------------------------------

#: nothing may be loaded from anywhere: images are data: URIs, style and script inline
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
:root { --fg: #1b1b1b; --muted: #5a5a5a; --line: #d6d6d6; --bg2: #f4f5f7; --accent: #0072B2; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
header.top { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: var(--bg2); }
header.top h1 { margin: 0 0 6px; font-size: 1.5em; }
nav.toc { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
  padding: 6px 28px; font-size: 0.9em; white-space: nowrap; overflow-x: auto; }
nav.toc a { margin-right: 14px; color: var(--accent); text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { margin-top: 26px; }
section section { margin-top: 18px; }
h2 { font-size: 1.3em; border-bottom: 2px solid var(--line); padding-bottom: 3px; }
h3 { font-size: 1.1em; margin-bottom: 6px; }
h4 { font-size: 1em; margin: 14px 0 4px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.tablewrap { display: inline-block; max-width: 100%; overflow: auto; max-height: 640px; margin: 6px 0;
  border: 1px solid var(--line); vertical-align: top; }
table { border-collapse: collapse; font-size: 0.88em; }
caption { text-align: left; font-weight: 600; padding: 4px 6px; }
th, td { padding: 3px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
td { max-width: 30em; overflow-wrap: anywhere; }
td.long { max-width: 18em; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
thead th { position: sticky; top: 0; background: var(--bg2); z-index: 1; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--fg); }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--fg); }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.diff { background: #fff3d6; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 0.85em; font-weight: 600;
  border: 1px solid transparent; }
.st-done, .st-ok, .st-complete { background: #dcefff; color: #004a75; border-color: #8cc4ec; }
.st-warning, .st-skipped, .st-incomplete, .st-running, .st-interrupted { background: #fff0c8; color: #6b4b00; border-color: #e6c15c; }
.st-failed, .st-rejected { background: #ffe1cc; color: #8a3100; border-color: #e59a66; }
.st-not-run, .st-unknown { background: #eee; color: #555; border-color: #ccc; }
.banner { padding: 10px 14px; border-radius: 6px; margin: 10px 0; border: 1px solid; }
.banner.failed { background: #ffe9db; border-color: #e59a66; }
.banner.incomplete, .banner.warn { background: #fff5d6; border-color: #e6c15c; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
.gallery.small { grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); }
.gallery.wide { grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); }
.gallery.figures { grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); align-items: start; }
.gallery.figures figure img { max-height: 520px; }
figure { margin: 6px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); display: block; }
.gallery figure img { max-height: 420px; width: auto; }
.gallery.small figure img { width: 100%; image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: var(--muted); margin-top: 2px; overflow-wrap: anywhere; }
.note { color: var(--muted); font-size: 0.9em; }
.missing { color: #8a3100; font-size: 0.9em; }
pre { background: var(--bg2); padding: 10px; overflow-x: auto; font-size: 0.85em; max-height: 520px; }
details { margin: 6px 0; }
summary { cursor: pointer; color: var(--accent); }
.compare { display: grid; gap: 10px; }
main figure img { cursor: zoom-in; }
#viewer { position: fixed; inset: 0; z-index: 10; background: rgba(0, 0, 0, 0.85); display: flex;
  align-items: center; justify-content: center; cursor: zoom-out; }
#viewer[hidden] { display: none; }
#viewer img { max-width: 96vw; max-height: 96vh; background: #fff; }
footer { color: var(--muted); font-size: 0.85em; padding: 10px 28px 30px; }
@media print { nav.toc { display: none; } .tablewrap { max-height: none; } }
"""

SCRIPT = """
(function () {
  "use strict";
  function key(cell) {
    var v = cell.getAttribute("data-sort");
    return v === null ? cell.textContent.trim() : v;
  }
  function isNumber(s) { return s !== "" && s !== "n/a" && isFinite(Number(s)); }
  function sortBy(table, th) {
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var body = table.tBodies[0];
    if (!body) { return; }
    var rows = Array.prototype.slice.call(body.rows);
    var keys = rows.map(function (r) { return r.cells[col] ? key(r.cells[col]) : ""; });
    var numeric = keys.every(function (k) { return k === "" || k === "n/a" || isNumber(k); });
    var descending = th.getAttribute("aria-sort") === "ascending";
    var order = rows.map(function (r, i) { return i; });
    order.sort(function (a, b) {
      var x = keys[a], y = keys[b];
      var ex = x === "" || x === "n/a", ey = y === "" || y === "n/a";
      if (ex || ey) { return ex === ey ? a - b : (ex ? 1 : -1); }  // empty cells last, either way
      var c = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true, sensitivity: "base"});
      if (c === 0) { return a - b; }
      return descending ? -c : c;
    });
    order.forEach(function (i) { body.appendChild(rows[i]); });
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    var table = th.closest("table");
    th.addEventListener("click", function () { sortBy(table, th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th); }
    });
  });
  // a click on a picture shows it at full size; a click or Escape closes it
  var viewer = document.createElement("div");
  viewer.id = "viewer";
  viewer.hidden = true;
  viewer.setAttribute("role", "dialog");
  viewer.appendChild(document.createElement("img"));
  document.body.appendChild(viewer);
  function closeViewer() { viewer.hidden = true; viewer.firstChild.removeAttribute("src"); }
  viewer.addEventListener("click", closeViewer);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { closeViewer(); } });
  document.querySelectorAll("main figure img").forEach(function (img) {
    img.addEventListener("click", function () {
      viewer.firstChild.src = img.src;
      viewer.firstChild.alt = img.alt;
      viewer.hidden = false;
    });
  });
  window.addEventListener("load", function () {
    var broken = Array.prototype.filter.call(document.querySelectorAll("main img"), function (img) {
      return !(img.complete && img.naturalWidth > 0);
    });
    document.documentElement.setAttribute("data-images", broken.length ? "broken " + broken.length : "ok");
    if (broken.length) {
      var p = document.createElement("p");
      p.className = "banner warn";
      p.textContent = broken.length + " image(s) of this report could not be displayed.";
      document.querySelector("main").prepend(p);
    }
  });
})();
"""


def page(title: str, header_html: str, nav: Sequence[tuple[str, str]], body: str, footer: str = "") -> str:
    """The whole HTML document: ``nav`` is ``(anchor, label)`` pairs of the sections in ``body``."""
    links = "".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label in nav)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="generator" content="medpipe">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
        f'<body><header class="top">{header_html}</header>'
        f'<nav class="toc" aria-label="sections">{links}</nav>\n'
        f"<main>{body}</main>\n"
        f"<footer>{esc(footer)}</footer>"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
