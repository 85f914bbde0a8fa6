"""report.html without a browser: contents, robustness (failed runs, missing and broken files), self-containment,
the runner writing it, and ``medpipe report`` (one run, several runs compared). The browser checks are in
``test_report_browser.py``."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import medpipe.report.html as report_html
import tests.toy_stages as toy
from medpipe.cli import app
from medpipe.config import load_pipeline
from medpipe.errors import ConfigError, MedpipeError, StageError
from medpipe.report.compare import comparison_html
from medpipe.report.html import run_report_html, write_run_report
from medpipe.report.html_ingest import reason_group
from medpipe.runner import run_pipeline
from tests.test_config import GOOD, write

#: every URL a page may name: in-page anchors and inline data
_URL_ATTR = re.compile(r"""\b(?:src|href|action|poster|data)\s*=\s*["']?([^"'\s>]*)""", re.IGNORECASE)


def assert_self_contained(html: str) -> None:
    """No attribute or CSS reference that would make a browser load anything: only ``#anchors`` and ``data:``.

    (The inline script is left to the browser tests: the page's Content-Security-Policy refuses any load.)"""
    markup = re.sub(r"<script>.*?</script>", "", html, flags=re.DOTALL)
    assert markup.count("<script") == 0, "a script other than the inline one"
    for url in _URL_ATTR.findall(markup):
        assert url.startswith(("#", "data:")), url
    assert not re.search(r"url\(\s*['\"]?(?!data:)", markup), "a CSS url() to something else than data:"
    assert not re.search(r"@import|<link\b|<iframe\b|<object\b|<embed\b", markup, re.IGNORECASE)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def _png(path: Path, shape: tuple[int, int] = (40, 60), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def _toy_run(tmp_path: Path, overrides: list[str] | None = None) -> Path:
    toy.CALLS.clear()
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_pipeline(load_pipeline(write(tmp_path, GOOD), overrides), tmp_path / "run")
    return tmp_path / "run"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/(?:png|jpeg);base64,([^"]+)"', html)]


# -- the runner writes it ------------------------------------------------------------------------------


def test_every_run_writes_a_report(tmp_path: Path) -> None:
    rd = _toy_run(tmp_path)
    html = (rd / "report.html").read_text()
    assert_self_contained(html)
    assert "toy: medpipe run report" in html and 'class="badge st-complete"' in html
    for key in ("00_toy_make", "01_toy_train"):
        assert f'id="stage-{key}"' in html
    assert "dice" in html and "roi_size" in html  # a metric and a parameter
    assert "report: " in (rd / "run.log").read_text()


def test_a_failed_run_still_gets_a_report_that_says_where_and_why(tmp_path: Path) -> None:
    with pytest.raises(StageError):
        _toy_run(tmp_path, ["toy_make.fail=true"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'class="badge st-failed"' in html and "The run failed" in html
    assert "asked to fail (fail: true)" in html
    assert re.search(r"01_toy_train.*?st-not-run", html, re.DOTALL)  # the stage after it never ran
    assert "provenance.json is missing" not in html  # written when the run starts, so a failed run has it too


def test_an_interrupted_run_gets_a_report(tmp_path: Path) -> None:
    # a runner records Ctrl-C as the stage failed (KeyboardInterrupt) or interrupted (medpipe's Interrupted)
    with pytest.raises((KeyboardInterrupt, MedpipeError)):
        _toy_run(tmp_path, ["toy_train.crash=true"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert re.search(r"The run (failed</strong> at stage|was interrupted</strong> \(Ctrl-C\) in stage) 01_toy_train",
                     html)
    assert "the end of run.log" in html


def _state_only_run(rd: Path, stages: dict[str, dict[str, object]]) -> Path:
    rd.mkdir(parents=True)
    kinds = [key.split("_", 1)[1] for key in stages]
    (rd / "resolved.yaml").write_text("name: crafted\nstages:\n" + "".join(f"- stage: {k}\n" for k in kinds))
    (rd / "state.json").write_text(json.dumps({"version": 1, "stages": stages}))
    return rd


def test_interrupted_stages_and_relocatable_paths(tmp_path: Path) -> None:
    rd = _state_only_run(tmp_path / "run", {
        "00_ingest": {"status": "done", "outputs": {"ingest_dir": "run:stages/00_ingest"}},
        "01_train_segmenter": {"status": "interrupted"}})
    _ingest_folder(rd / "stages" / "00_ingest")
    html = run_report_html(rd)
    assert 'class="badge st-interrupted"' in html and "The run was interrupted</strong> (Ctrl-C) in stage " \
        "01_train_segmenter" in html and "--resume" in html
    _check_qa(html)  # the ingest folder found through its run: path


def test_a_report_that_cannot_be_written_does_not_fail_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("planted")

    monkeypatch.setattr(report_html, "run_report_html", broken)
    with caplog.at_level(logging.WARNING, logger="medpipe.report"):
        rd = _toy_run(tmp_path)
    assert (rd / "metrics.json").is_file() and not (rd / "report.html").exists()
    assert "report.html not written: RuntimeError: planted" in caplog.text


# -- contents ------------------------------------------------------------------------------------------


def _fake_stage_outputs(rd: Path) -> None:
    """Pictures and tables as the real stages name them, in the toy run's stage folders."""
    train = rd / "stages" / "01_toy_train"
    _png(train / "curve.png", (400, 700))
    _png(train / "overlays" / "P1_abc.png", seed=1)
    _png(train / "overlays" / "P2_def.png", seed=2)
    (train / "cases.csv").write_text("patient_id,dice\nP<script>alert(1)</script>,0.5\nP2,0.9\n")
    (train / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def test_report_shows_pictures_tables_and_notes_broken_files(tmp_path: Path) -> None:
    rd = _toy_run(tmp_path)
    _fake_stage_outputs(rd)
    html = run_report_html(rd)
    assert_self_contained(html)
    pictures = _images(html)
    assert len(pictures) == 3  # curve and two overlays; the broken roc.png is named, not embedded
    for data in pictures:
        with Image.open(__import__("io").BytesIO(data)) as im:
            assert im.width <= 900
    assert "roc.png: cannot be read" in html
    assert "P&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    assert "Per-case results: cases.csv (2 rows)" in html
    assert 'class="sortable"' in html


def test_large_images_are_downscaled_and_the_budget_holds(tmp_path: Path) -> None:
    rd = _toy_run(tmp_path)
    for i in range(5):
        _png(rd / "stages" / "01_toy_train" / "overlays" / f"case{i}.png", (900, 2400), seed=i)
    html = run_report_html(rd)
    widths = [Image.open(__import__("io").BytesIO(d)).width for d in _images(html)]
    assert widths and max(widths) <= 800  # the overlays' gallery width
    small = run_report_html(rd, image_budget=len(_images(html)[0]) + 10)
    assert len(_images(small)) == 1 and "image budget" in small and "4 image(s) not embedded" in small


def test_missing_files_and_an_unknown_state_give_a_report(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "resolved.yaml").write_text("name: half\nseed: 0\nstages:\n- stage: ingest\n  out: null\n")
    html = run_report_html(rd)
    assert "No run state" in html and "state.json is missing" in html and "metrics.json is missing" in html
    (rd / "state.json").write_text('{"version": 1, "stages": {"00_ingest": {"status": "running"}}}')
    html = run_report_html(rd)
    assert "was running when this report was written" in html
    assert "manifest.csv: not found" in html  # the ingest QA of an ingest that never finished
    with pytest.raises(ConfigError, match="not a medpipe run directory"):
        run_report_html(tmp_path)


def _ingest_folder(ingest: Path) -> None:
    """What ``medpipe ingest`` writes, in small: a manifest (one ok, one warning series), previews, rejections."""
    (ingest / "volumes" / "P1").mkdir(parents=True)
    _png(ingest / "volumes" / "P1" / "a.png", seed=3)
    _png(ingest / "volumes" / "P1" / "b.png", seed=4)
    (ingest / "manifest.csv").write_text(
        "series_uid,patient_id,modality,series_number,series_description,part,n_files,status,reasons,preview\n"
        "1.2.3,P1,MR,1,T1,,30,ok,,volumes/P1/a.png\n"
        "1.2.4,P1,CT,2,tilted,,40,warning,gantry tilt 12 degrees: resampled,volumes/P1/b.png\n")
    (ingest / "rejected.csv").write_text(
        "path,reason\n/src/x,not a DICOM file\n/src/y,not a DICOM file\n"
        "/src/z,duplicate SOP Instance UID 1.2.840.1234.5 (also in /src/w)\n"
        "/src/v,duplicate SOP Instance UID 1.2.840.99.7 (also in /src/u)\n")


def _check_qa(html: str) -> None:
    assert "2 series: 1 warning, 1 ok" in html and "gantry tilt 12 degrees: resampled" in html
    assert 'class="badge st-warning"' in html
    assert len(_images(html)) == 2
    assert html.index("tilted · warning") < html.index("#1 T1 · ok")  # the series to look at first
    assert "Rejected files by reason (4 files)" in html
    assert "duplicate SOP Instance UID &lt;UID&gt; (also in another file): 2 file(s)" in html
    assert "not a DICOM file: 2 file(s)" in html


def test_ingest_qa_lists_series_previews_and_rejections_by_reason(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    ingest = rd / "stages" / "00_ingest"
    _ingest_folder(ingest)
    (rd / "resolved.yaml").write_text("name: qa\nstages:\n- stage: ingest\n")
    (rd / "state.json").write_text(json.dumps({"version": 1, "stages": {"00_ingest": {
        "status": "done", "outputs": {"ingest_dir": str(ingest)}, "metrics": {"n_files": 9}}}}))
    _check_qa(run_report_html(rd))


def test_cli_writes_the_qa_page_of_an_ingest_folder(tmp_path: Path) -> None:
    _ingest_folder(tmp_path / "ingested")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "ingested")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "ingested" / "report.html").read_text()
    assert_self_contained(html)
    assert "Ingest QA: ingested" in html
    _check_qa(html)


def test_reason_groups_drop_specifics() -> None:
    assert reason_group("series 1.2.3.4.5 rejected: too few slices") == "series <UID> rejected: too few slices"
    assert reason_group("duplicate SOP Instance UID 2.25.1234 (also in /a/b)") == \
        "duplicate SOP Instance UID 2.25.1234 (also in another file)"  # 2 components: no UID


# -- medpipe report ------------------------------------------------------------------------------------


def test_cli_rebuilds_a_report_and_compares_runs(tmp_path: Path) -> None:
    a = _toy_run(tmp_path / "a")
    b = _toy_run(tmp_path / "b", ["toy_train.epochs=5", "toy_make.n=2"])
    (a / "report.html").unlink()
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(a)])
    assert result.exit_code == 0, result.output
    assert (a / "report.html").is_file() and str(a / "report.html") in result.output

    out = tmp_path / "cmp.html"
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert_self_contained(html)
    diff = html[html.index('id="parameters"'):html.index('id="metrics"')]
    assert "2 of" in diff and "01_toy_train.epochs" in diff and "00_toy_make.n" in diff
    assert "01_toy_train.roi_size" not in diff  # equal in both runs
    metrics = html[html.index('id="metrics"'):]
    dice_a = json.loads((a / "metrics.json").read_text())["dice"]
    dice_b = json.loads((b / "metrics.json").read_text())["dice"]
    row = re.search(r"<tr><td>01_toy_train\.dice</td>(.*?)</tr>", metrics).group(1)
    assert f"{dice_a:.4g}" in row and f"{dice_b:.4g}" in row and dice_a != dice_b


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a medpipe run directory" in result.output
    with pytest.raises(ConfigError, match="at least two"):
        comparison_html([tmp_path])


def test_write_run_report_to_another_file(tmp_path: Path) -> None:
    rd = _toy_run(tmp_path)
    out = write_run_report(rd, tmp_path / "elsewhere" / "r.html")
    assert out.is_file() and "toy: medpipe run report" in out.read_text()


def test_huge_ingests_are_cut_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medpipe.report.html_ingest as qa

    monkeypatch.setattr(qa, "MAX_SERIES_ROWS", 1)
    monkeypatch.setattr(qa, "MAX_REASONS", 1)
    monkeypatch.setattr(qa, "PATHS_PER_REASON", 1)
    _ingest_folder(tmp_path / "ingested")
    html = qa.ingest_qa_html(tmp_path / "ingested", report_html.h.Images())
    assert "the first 1 of 2 series" in html and "the 1 most frequent of 2 reasons" in html
    assert "… and 1 more" in html and "/src/y" not in html
