"""End to end: ``medpipe run pipelines/lung_nodules.yaml`` at a tiny size (the real file, shrunk with --set):
sample -> ingest -> datalist from the SR -> train_detector -> evaluate_detector -> score an unseen export.

Checks the wiring and the outputs (FROC numbers consistent with the per-nodule table, the model package, the
scoring SR's SCOORD3D points round-tripping to the detections in findings.csv, the key images' markers on the
findings, every DICOM written dciodvfy-clean). A detector this small and this briefly trained finds little;
how well the full-size pipeline detects is in the README.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from medpipe.cli import app
from tests.dicom_checks import DCIODVFY, dciodvfy_errors
from tests.pipeline_support import set_options

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "lung_nodules.yaml"
TINY = {"matrix": 64, "min_thickness": 5.0, "max_thickness": 5.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(tmp_path: Path) -> list[str]:
    sets = {
        "stages.0.out": str(tmp_path / "sample"), "stages.0.cases": 8, **{f"stages.0.{k}": v for k, v in TINY.items()},
        "train_detector.pixdim": [6.0, 6.0, 6.0], "train_detector.patch_size": [32, 32, 32],
        "train_detector.anchor_shapes": [[2, 2, 2], [3, 3, 3]], "train_detector.widths": [4, 8, 16, 32],
        "train_detector.fpn_channels": 16, "train_detector.epochs": 2, "train_detector.val_every": 1,
        "train_detector.detections_per_image": 4, "train_detector.report_threshold": 0.0,
        "evaluate_detector.bootstrap": 50,
        "stages.5.out": str(tmp_path / "unseen"), "stages.5.cases": 2, **{f"stages.5.{k}": v for k, v in TINY.items()},
        "score.source": str(tmp_path / "unseen"),
    }
    return set_options(sets)


@pytest.mark.slow
def test_lung_nodules_pipeline_small(tmp_path: Path) -> None:
    from medpipe.dicom.frames import frame_geometries
    from medpipe.dicom.sr import read_findings_sr
    from medpipe.scoring.results import nearest_frame

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(PIPELINE), "--out", str(run_dir), "--device", "cpu", *small(tmp_path)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert [s["stage"] for s in resolved["stages"]] == ["sample_chest_ct", "ingest", "dataset", "train_detector",
                                                          "evaluate_detector", "sample_chest_ct", "score"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["cpm"] <= 1.0 and len(metrics["sensitivity"]) == 7
    assert metrics["cpm"] == pytest.approx(np.mean(list(metrics["sensitivity"].values())), abs=1e-3)
    evaluation = run_dir / "stages" / "04_evaluate_detector"
    assert (evaluation / "froc.png").stat().st_size > 1000
    nodules = list(csv.DictReader((evaluation / "nodules.csv").open()))
    assert len(nodules) == metrics["n_nodules"] and metrics["found_at_1fp"] == sum(
        r["found_at_1fp"] == "True" for r in nodules)
    package = json.loads((run_dir / "stages" / "03_train_detector" / "model" / "model.json").read_text())
    assert package["kind"] == "detector" and package["inference"]["report_threshold"] == 0.0

    scores = list(csv.DictReader((run_dir / "stages" / "06_score" / "scores.csv").open()))
    assert [r["status"] for r in scores] == ["ok", "ok"]
    checked = 0
    score_dir = run_dir / "stages" / "06_score"
    for row in scores:
        folder = score_dir / row["results"]
        found = [r for r in csv.DictReader((folder / "findings.csv").open()) if r["reported"] == "True"]
        assert int(row["findings"]) == len(found)
        report = read_findings_sr(folder / "sr.dcm")
        # the SR's SCOORD3D points and diameters are the detections written to findings.csv (world mm)
        assert [tuple(round(v, 2) for v in f.center) for f in report.findings] == \
            [(float(r["x"]), float(r["y"]), float(r["z"])) for r in found]
        assert [round(f.diameter_mm, 2) for f in report.findings] == [float(r["diameter_mm"]) for r in found]
        for r in found:
            sc = pydicom.dcmread(score_dir / r["key_image"])
            assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
            src = next(p for p in (tmp_path / "unseen").rglob("*.dcm")
                       if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == r["frame_sop_instance_uid"])
            frames = frame_geometries([pydicom.dcmread(src, stop_before_pixels=True)])
            _, (rr, cc) = nearest_frame(frames, (float(r["x"]), float(r["y"]), float(r["z"])))
            # the marker (the circle's outline drawn in colour) surrounds the finding's pixel
            rgb = sc.pixel_array.astype(int)
            coloured = np.argwhere(np.ptp(rgb, axis=2) > 40)
            assert len(coloured), r
            centre = (coloured.min(0) + coloured.max(0)) / 2
            assert np.allclose(centre, (rr, cc), atol=2.5), (centre, rr, cc)
            checked += 1
        if DCIODVFY is not None:
            for path in [folder / "sr.dcm", *(score_dir / r["key_image"] for r in found)]:
                assert dciodvfy_errors(path) == [], path
    assert checked >= 1
