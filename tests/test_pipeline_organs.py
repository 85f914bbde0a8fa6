"""End to end: ``medpipe run pipelines/organs.yaml`` at a small size (the real file, shrunk with --set): chest CT
phantoms -> ingest -> datalist from the organ SEG -> multi-class U-Net -> per-organ evaluation -> a multi-segment
SEG and an SR of organ volumes for each study of an unseen export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.dicom.anatomy import anatomy_codes
from medpipe.sample.chest_phantom import ORGANS
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy
from tests.pipeline_support import set_options

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "organs.yaml"
TINY = {"matrix": 48, "min_thickness": 6.0, "max_thickness": 6.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(tmp_path: Path) -> list[str]:
    """Six small studies (48 x 48 pixels of ~8 mm, 6 mm slices) seen at 8 mm in 24^3 patches by a small U-Net for
    200 epochs (about 20 s); two unseen studies scored."""
    patch = [24, 24, 24]
    sets = {
        "stages.0.out": str(tmp_path / "sample"), "stages.0.cases": 6, "stages.0.workers": 1,
        **{f"stages.0.{k}": v for k, v in TINY.items()},
        "train_segmenter.channels": [8, 16, 32], "train_segmenter.strides": [2, 2], "train_segmenter.epochs": 200,
        "train_segmenter.lr": 0.005, "train_segmenter.val_every": 50, "train_segmenter.roi_size": patch,
        "train_segmenter.train_transforms.3.Spacingd.pixdim": [8.0, 8.0, 8.0],
        "train_segmenter.eval_transforms.3.Spacingd.pixdim": [8.0, 8.0, 8.0],
        "train_segmenter.train_transforms.6.SpatialPadd.spatial_size": patch,
        "train_segmenter.train_transforms.7.RandCropByLabelClassesd.spatial_size": patch,
        "evaluate.bootstrap": 200,
        "stages.5.out": str(tmp_path / "unseen"), **{f"stages.5.{k}": v for k, v in TINY.items()},
        "score.source": str(tmp_path / "unseen"),
    }
    return set_options(sets)


@pytest.mark.slow
@needs_dciodvfy
def test_organs_pipeline_small(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(PIPELINE), "--out", str(run_dir), "--device", "cpu", *small(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = [n.lower() for n in ORGANS.values()]

    # per organ: Dice and HD95 with their intervals (two test studies: defined), in metrics.json and per_label.csv
    per_label = metrics["per_label"]
    assert list(per_label) == names
    for name in names:
        m = per_label[name]
        assert m["n"] == 2 and set(m) >= {"dice", "dice_ci95", "hd95", "hd95_ci95", "false_positive_cases"}
        assert m["dice"] is None or m["dice_ci95"][0] <= m["dice"] <= m["dice_ci95"][1]
    # Guards: a model that learnt nothing (an empty prediction scores 0) or mixes the organs up; these 200 small
    # epochs reach about 0.83 on the lungs and the liver and 0.78 on the heart
    assert per_label["lungs"]["dice"] > 0.6 and per_label["liver"]["dice"] > 0.6 and per_label["heart"]["dice"] > 0.4
    evaluation = run_dir / "stages" / "04_evaluate"
    with open(evaluation / "per_label.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == names and float(rows[0]["dice"]) == pytest.approx(per_label["lungs"]["dice"])
    assert (evaluation / "per_label.png").stat().st_size > 10_000
    report = (run_dir / "report.html").read_text()
    assert "Per class (organ): Dice and HD95" in report and "per_label.csv (8 rows)" in report

    # the model package names and codes every organ as the truth SEG did
    model = json.loads((run_dir / "stages" / "03_train_segmenter" / "model" / "model.json").read_text())
    classes = model["outputs"]["classes"]
    assert [c["name"] for c in classes.values()] == names
    assert all({"category": c["category"], "type": c["type"]} == anatomy_codes(c["name"]) for c in classes.values())

    # the unseen export: a multi-segment SEG with those codes and an SR of organ volumes per study, valid DICOM
    assert metrics["scored"] == 2 and metrics["score_failed"] == 0
    scored = run_dir / "stages" / "06_score"
    with open(scored / "scores.csv", newline="") as fh:
        scores = list(csv.DictReader(fh))
    for row in scores:
        assert all(float(row[f"{n}_ml"]) >= 0 for n in names) and float(row["lungs_ml"]) > 500
        seg = pydicom.dcmread(scored / row["seg"])
        assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == names
        assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
            [c["type"]["value"] for c in classes.values()]
        assert dciodvfy_errors(scored / row["seg"]) == [] and dciodvfy_errors(scored / row["sr"]) == []
