"""End to end: the shipped classification pipelines, run through the CLI at a tiny size (the real files, shrunk
with --set), so their YAML stays valid and every stage connects to the next."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.data.datalist import load_datalist
from tests.pipeline_support import set_options

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _run(pipeline: str, run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["run", str(PIPELINES / pipeline), "--out", str(run_dir), "--device", "cpu",
                                      *set_options(values)])
    assert result.exit_code == 0, result.output
    return json.loads((run_dir / "metrics.json").read_text())


TINY_CLASSIFIER = {"widen_factor": 0.125, "epochs": 1, "stem_stride": 2}


def test_breastmnist_pipeline_small(tmp_path: Path, shared_data: Path) -> None:
    values = {"stages.0.path": str(shared_data / "breastmnist" / "breastmnist.npz"),
              **{f"train_classifier.{k}": v for k, v in TINY_CLASSIFIER.items()},
              "train_classifier.folds": 2, "evaluate_classifier.bootstrap": 100, "explain.max_cases": 2,
              "explain.methods": ["gradcam", "gradcampp"]}
    metrics = _run("breastmnist.yaml", tmp_path / "run", values)
    assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["n_cases"] == 156 and metrics["ensemble_size"] == 2 and metrics["positive_class"] == "malignant"
    stages = tmp_path / "run" / "stages"
    assert len(list((stages / "03_explain").glob("*_explain.png"))) == 2


def test_gan_augment_pipeline_small(tmp_path: Path, shared_data: Path) -> None:
    values: dict[str, Any] = {"stages.0.path": str(shared_data / "breastmnist" / "breastmnist.npz"),
                              "train_gan.epochs": 1, "train_gan.extractor_epochs": 1,
                              "train_gan.extractor_width": 0.125, "train_gan.n_eval": 64, "train_gan.fid_every": 0,
                              "augment.n": 12}
    for i in (1, 5):
        values.update({f"stages.{i}.{k}": v for k, v in TINY_CLASSIFIER.items()})
    for i in (2, 6):
        values[f"stages.{i}.bootstrap"] = 50
    _run("gan_augment.yaml", tmp_path / "run", values)
    stages = tmp_path / "run" / "stages"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]
    assert metrics["05_train_classifier"]["n_synthetic_train"] == 12
    assert metrics["01_train_classifier"]["n_synthetic_train"] == 0
    assert metrics["02_evaluate_classifier"]["n_cases"] == metrics["06_evaluate_classifier"]["n_cases"] == 156
    assert (stages / "03_train_gan" / "samples.png").is_file()
    augmented = load_datalist(stages / "04_augment" / "datalist.json")
    assert sum(1 for it in augmented["train"] if it.get("synthetic")) == 12
    assert not any(it.get("synthetic") for split in ("val", "test") for it in augmented[split])


def test_brain_tumor_presence_pipeline_small(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "sample.out": str(tmp_path / "sample"), "sample.cases": 8, "sample.matrix": 48, "sample.pixel_spacing": 4.0,
        "sample.slices": 12, "sample.slice_thickness": 10.0, "explain.max_cases": 1,
        "explain.methods": ["gradcam", "occlusion"], "explain.mask_size": 8,
    }
    for i in (3, 5):
        values.update({f"stages.{i}.epochs": 1, f"stages.{i}.widen_factor": 0.125, f"stages.{i}.spatial_size": [32, 32, 8]})
    for i in (4, 6):
        values[f"stages.{i}.bootstrap"] = 50
    metrics = _run("brain_tumor_presence.yaml", tmp_path / "run", values)
    resolved = yaml.safe_load((tmp_path / "run" / "resolved.yaml").read_text())
    assert [s.get("model") for s in resolved["stages"] if s["stage"] == "train_classifier"] == ["resnet18", "cnn_rnn"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["positive_class"] == "tumour"
    rows = list(csv.DictReader((tmp_path / "run" / "stages" / "07_explain" / "explanations.csv").open()))
    assert len(rows) == 1
