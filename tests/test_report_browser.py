"""report.html in a real browser (headless Chromium, Debian's ``chromium``): the reports of two small real runs
(``pipelines/brain_tumor.yaml`` shrunk, and a tiny classification pipeline with Grad-CAM, a GAN and
augmentation) and their comparison page render without a JavaScript error, load every image, contact nothing
outside the file, are not blank, and their tables sort when a header is clicked.

Chromium is driven through the DevTools protocol over a pipe (``tests/chromium.py``). These tests skip only
where Chromium is not installed (``.ci/run`` installs it, so CI runs them).
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.report.html import write_run_report
from tests.chromium import Chromium, file_url, find_chromium
from tests.test_pipeline_brain_tumor import PIPELINE as BRAIN_TUMOR
from tests.test_pipeline_brain_tumor import small
from tests.test_report_html import _toy_run, assert_self_contained

pytestmark = pytest.mark.slow

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                                            "chromium; .ci/run installs it)")


def _one_thread_run(args: list[str]) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def brain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pipelines/brain_tumor.yaml`` at the size of the end-to-end test: 6 studies, 2 epochs, 2 studies scored."""
    root = tmp_path_factory.mktemp("report_brain")
    _one_thread_run(["run", str(BRAIN_TUMOR), "--out", str(root / "run"), "--device", "cpu", *small(root)])
    return root / "run"


def _disc_png(path: Path, cls: int, rng: np.random.Generator) -> str:
    """Class 0: a bright disc on a dark background; class 1: a dark disc on a bright one (plus noise)."""
    yy, xx = np.indices((28, 28))
    c = rng.uniform(9, 19, 2)
    disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 36
    image = np.where(disc, 200, 50) if cls == 0 else np.where(disc, 50, 200)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(path)
    return str(path)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classification pipeline: ResNet, evaluation with CIs, Grad-CAM, a GAN and augmentation."""
    root = tmp_path_factory.mktemp("report_class")
    rng = np.random.default_rng(0)
    doc: dict[str, Any] = {"class_names": {"0": "bright", "1": "dark"}, "train": [], "val": [], "test": []}
    for i in range(48):
        split = "train" if i < 32 else "val" if i < 40 else "test"
        cls = i % 2
        case = f"case-{i:02d}"
        doc[split].append({"image": _disc_png(root / "images" / f"{case}.png", cls, rng), "class": cls,
                           "patient_id": case, "study_uid": case})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps(doc))
    pipeline = root / "tiny.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        name: tiny_classifier
        seed: 0
        cpu_threads: 1
        stages:
          - stage: train_classifier
            datalist: {datalist}
            model: resnet18
            stem: small
            stem_stride: 2
            widen_factor: 0.125
            epochs: 2
            batch_size: 8
          - stage: evaluate_classifier
            datalist: {datalist}
            bootstrap: 50
          - stage: explain
            datalist: {datalist}
            cases: all
            max_cases: 2
            methods: [gradcam, gradcampp]
          - stage: train_gan
            datalist: {datalist}
            target_class: 0
            epochs: 2
            batch_size: 8
            latent_dim: 8
            g_channels: 4
            d_channels: 4
            n_eval: 16
            fid_every: 1
            extractor_epochs: 1
            extractor_width: 0.125
            grid: 3
          - stage: augment
            datalist: {datalist}
            n: 4
        """))
    _one_thread_run(["run", str(pipeline), "--out", str(root / "run"), "--device", "cpu"])
    return root / "run"


@pytest.fixture(scope="module")
def browser() -> Any:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    with Chromium(CHROMIUM, width=1280, height=900) as c:
        yield c


def _open(browser: Chromium, path: Path) -> None:
    browser.events.clear()
    browser.open(file_url(path))


def check_page(browser: Chromium, path: Path, min_images: int) -> None:
    """The page at ``path``: loaded in Chromium without errors, every image decoded, nothing fetched, not blank."""
    html = path.read_text()
    assert_self_contained(html)
    _open(browser, path)
    n = browser.evaluate("document.querySelectorAll('main img').length")  # (the full-size viewer's is empty)
    assert n == html.count("<img ") and n >= min_images, (n, min_images)
    broken = browser.evaluate("Array.from(document.querySelectorAll('main img'))"
                              ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)")
    assert broken == [], broken
    assert browser.evaluate("document.documentElement.dataset.images") == "ok"  # the page's own check agrees
    assert browser.errors() == []
    page = file_url(path)
    assert [u for u in browser.requested_urls() if u != page and not u.startswith("data:")] == []
    shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"))
    assert shot.shape[:2] == (900, 1280)
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50, "the screenshot looks blank"
    assert (shot.min(axis=-1) < 200).mean() > 0.02, "hardly anything drawn"


def _column(browser: Chromium, table_js: str, header: str) -> tuple[int, list[str]]:
    """Index and cell texts (in displayed order) of the column ``header`` of the table ``table_js`` selects."""
    col = browser.evaluate(f"Array.from(({table_js}).tHead.rows[0].cells).findIndex(c => c.textContent === "
                           f"{json.dumps(header)})")
    assert col >= 0, header
    values = browser.evaluate(f"Array.from(({table_js}).tBodies[0].rows).map(r => r.cells[{col}].textContent)")
    return col, values


def check_sorting(browser: Chromium, table_js: str, header: str, numeric: bool) -> None:
    """Clicking ``header`` sorts its table ascending, a second click descending (numbers as numbers)."""
    col, before = _column(browser, table_js, header)
    key = (lambda v: float(v)) if numeric else (lambda v: v.lower())
    assert len(before) >= 3 and before != sorted(before, key=key), f"{header}: already sorted, nothing to test"
    browser.evaluate(f"({table_js}).tHead.rows[0].cells[{col}].setAttribute('data-click-me', '')")
    browser.click("[data-click-me]")
    _, ascending = _column(browser, table_js, header)
    assert ascending == sorted(before, key=key), ascending
    browser.click("[data-click-me]")
    _, descending = _column(browser, table_js, header)
    assert descending == sorted(before, key=key, reverse=True), descending
    assert browser.evaluate("document.querySelector('[data-click-me]').getAttribute('aria-sort')") == "descending"
    browser.evaluate("document.querySelector('[data-click-me]').removeAttribute('data-click-me')")
    assert browser.errors() == []


@needs_chromium
def test_brain_tumor_report_in_chromium(brain_run: Path, browser: Chromium) -> None:
    report = brain_run / "report.html"
    html = report.read_text()
    # what the page shows: the segmentation's metrics with CIs, its pictures, the ingest QA, provenance
    for text in ('id="stage-03_train_segmenter"', "Training curve", "Evaluation overlays", "Scored studies",
                 "Ingest QA", "Rejected files by reason", "dice", "hd95", "95% CI", 'id="provenance"', "resolved.yaml"):
        assert text in html, text
    # images: curve, an overlay per test case, a preview per ingested series and per scored study
    n_series = sum(1 for _ in (brain_run / "stages" / "01_ingest").glob("volumes/*/*.png"))
    n_scored = sum(1 for _ in (brain_run / "stages" / "07_score").glob("results/*/*/preview.png"))
    assert n_series >= 24 and n_scored == 2
    check_page(browser, report, min_images=1 + 1 + n_series + n_scored)
    # numbers sort as numbers: the stages' seconds (4.0 < 15.7 < 46 but "15.7" < "4.0" as text)
    check_sorting(browser, "document.querySelector('#summary table')", "seconds", numeric=True)
    check_sorting(browser, "document.querySelector('#qa-01_ingest table')", "series_description", numeric=False)
    assert report.stat().st_size < 6_000_000


@needs_chromium
def test_brain_tumor_report_has_no_names_or_birth_dates(brain_run: Path) -> None:
    html = (brain_run / "report.html").read_text()
    sources = sorted((brain_run.parent / "sample").rglob("*.dcm"))
    assert sources
    for path in sources[:: max(1, len(sources) // 20)]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.PatientName)
        assert name and name not in html and name.replace("^", " ") not in html
        assert ds.PatientBirthDate and ds.PatientBirthDate not in html


@needs_chromium
def test_classification_report_in_chromium(class_run: Path, browser: Chromium) -> None:
    report = class_run / "report.html"
    html = report.read_text()
    for text in ("ROC curve", "Confusion matrix", "Calibration", "Explanations", "GAN samples", "Synthetic training",
                 "auc", "Per-case predictions"):
        assert text in html, text
    # curve x2 (classifier, GAN), ROC, confusion, calibration, 2 explanations, GAN samples, 4 synthetic images
    check_page(browser, report, min_images=12)
    table = ("Array.from(document.querySelectorAll('#stage-01_evaluate_classifier table'))"
             ".find(t => t.tHead.rows[0].textContent.includes('prob_0'))")
    check_sorting(browser, table, "prob_0", numeric=True)
    check_sorting(browser, table, "case", numeric=False)
    # a click on a picture shows it at full size, Escape closes it
    browser.evaluate("document.querySelector('#stage-01_evaluate_classifier figure img')"
                     ".setAttribute('data-click-me', '')")
    browser.click("[data-click-me]")
    assert browser.evaluate("!document.getElementById('viewer').hidden && document.querySelector('#viewer img').src"
                            " === document.querySelector('[data-click-me]').src")
    browser.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                            "windowsVirtualKeyCode": 27})
    assert browser.evaluate("document.getElementById('viewer').hidden")
    assert browser.errors() == []


@needs_chromium
def test_sorting_semantics_in_chromium(tmp_path: Path, browser: Chromium) -> None:
    """Numbers sort as numbers (not as text: "10" < "9"; exponents), empty and n/a cells go last both ways,
    text sorts case-insensitively with numbers inside it in numeric order."""
    rd = _toy_run(tmp_path)
    (rd / "stages" / "01_toy_train" / "cases.csv").write_text(
        "case,value\ncase10,10\nCase9,9\ncase100,100\ncase-a,\ncase2,2e-3\ncase1,-1.5\ncase-b,n/a\n")
    report = write_run_report(rd)
    _open(browser, report)
    table = ("Array.from(document.querySelectorAll('#stage-01_toy_train table'))"
             ".find(t => t.tHead.rows[0].cells[0].textContent === 'case')")
    assert _column(browser, table, "case")[1][0] == "case10"
    browser.evaluate(f"({table}).tHead.rows[0].cells[1].setAttribute('data-click-me', '')")
    browser.click("[data-click-me]")
    assert _column(browser, table, "value")[1] == ["-1.5", "2e-3", "9", "10", "100", "", "n/a"]
    browser.click("[data-click-me]")
    assert _column(browser, table, "value")[1] == ["100", "10", "9", "2e-3", "-1.5", "", "n/a"]
    browser.evaluate("document.querySelector('[data-click-me]').removeAttribute('data-click-me')")
    browser.evaluate(f"({table}).tHead.rows[0].cells[0].setAttribute('data-click-me', '')")
    browser.click("[data-click-me]")
    assert _column(browser, table, "case")[1] == ["case-a", "case-b", "case1", "case2", "Case9", "case10", "case100"]
    assert browser.errors() == []


@needs_chromium
def test_comparison_page_in_chromium(brain_run: Path, class_run: Path, browser: Chromium, tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    result = CliRunner().invoke(app, ["report", str(brain_run), str(class_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    check_page(browser, out, min_images=3)  # the training curves (segmenter, classifier, GAN)
    html = out.read_text()
    assert "04_evaluate.dice" in html and "01_evaluate_classifier.auc" in html
    check_sorting(browser, "document.querySelector('#parameters table')", "parameter", numeric=False)
