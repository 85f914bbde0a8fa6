"""End to end: ``medpipe run pipelines/brain_tumor.yaml`` at a small size (the real file, shrunk with --set)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import medpipe.stages.evaluate
import medpipe.stages.predict
import medpipe.stages.train_segmenter  # noqa: F401  (registered even before STAGE_MODULES lists them)
from medpipe.cli import app
from medpipe.data.datalist import load_datalist
from medpipe.stage import RunContext
from medpipe.stages.predict import PredictParams, predict
from tests.pipeline_support import set_options

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "brain_tumor.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(tmp_path: Path) -> list[str]:
    """Six small studies (all with tumour, so the one test case has a Dice), a tiny U-Net, 40 epochs; then two
    unseen small studies scored."""
    tiny = {"matrix": 64, "pixel_spacing": 3.0, "slices": 16, "slice_thickness": 8.0}
    sets = {
        "stages.0.out": str(tmp_path / "sample"), "stages.0.cases": 6, "stages.0.tumor_fraction": 1.0,
        **{f"stages.0.{k}": v for k, v in tiny.items()},
        "train_segmenter.channels": [4, 8], "train_segmenter.strides": [2], "train_segmenter.epochs": 40,
        "train_segmenter.val_every": 10, "evaluate.tta": False, "evaluate.bootstrap": 100,
        "stages.6.out": str(tmp_path / "unseen"), "stages.6.cases": 2, **{f"stages.6.{k}": v for k, v in tiny.items()},
        "score.source": str(tmp_path / "unseen"),
    }
    return set_options(sets)


@pytest.mark.slow
def test_brain_tumor_pipeline_small(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(PIPELINE), "--out", str(run_dir), "--device", "cpu", *small(tmp_path)])
    assert result.exit_code == 0, result.output

    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert [s["stage"] for s in resolved["stages"]] == ["sample", "ingest", "dataset", "train_segmenter", "evaluate",
                                                          "predict", "sample", "score"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Guards: a model that learnt nothing. An empty mask scores 0 and a full one about 0.004 here; 40 tiny
    # epochs reach about 0.8
    assert isinstance(metrics["dice"], float) and metrics["dice"] > 0.5
    # one test case: the interval is undefined (null), not a zero-width [dice, dice]
    assert metrics["n_with_tumour"] == 1 and metrics["dice_ci95"] == [None, None]
    assert metrics["epochs_run"] == 40 and "best_val_dice" in metrics and metrics["n_predicted"] >= 1

    stages = run_dir / "stages"
    train = next(stages.glob("*_train_segmenter"))
    assert (train / "checkpoint.pt").is_file() and (train / "curve.png").is_file()
    ck = torch.load(train / "checkpoint.pt", weights_only=True)
    assert ck["channels"] == ["T1", "T1c", "T2", "FLAIR"] and ck["model"]["in_channels"] == 4
    evaluation = next(stages.glob("*_evaluate"))
    assert list((evaluation / "overlays").glob("*.png")) and (evaluation / "cases.csv").is_file()

    from medpipe.stage import from_run_path

    datalist = load_datalist(Path(from_run_path(json.loads((run_dir / "state.json").read_text())["stages"]
                                                ["02_dataset"]["outputs"]["datalist"], run_dir)))
    pred = next(stages.glob("*_predict"))
    masks = sorted((pred / "predictions").glob("*.nii.gz"))
    assert len(masks) == len(datalist["test"]) >= 1
    for item in datalist["test"]:
        ref = nib.load(item["reference_volume"])
        mask = nib.load(next(m for m in masks if m.name.startswith(item["patient_id"] + "_")))
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)

    # the unseen export was scored by the model package the training stage wrote
    assert (train / "model" / "model.json").is_file() and (train / "model" / "model_card.md").is_file()
    assert metrics["scored"] == 2 and metrics["score_failed"] == 0
    scored = next(stages.glob("*_score"))
    assert len(list((scored / "results").rglob("seg.dcm"))) == len(list((scored / "results").rglob("sr.dcm"))) == 2

    # medpipe export: the package with the run's held-out metrics in its card, the same model id
    exported = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    from medpipe.inference.package import ModelPackage

    assert ModelPackage.load(tmp_path / "exported").id == ModelPackage.load(train / "model").id
    card = (tmp_path / "exported" / "model_card.md").read_text()
    held_out = json.loads((tmp_path / "exported" / "metrics.json").read_text())
    assert list(held_out) == ["04_evaluate"] and held_out["04_evaluate"]["dice"] == metrics["dice"]
    assert "Held-out evaluation" in card and "04_evaluate" in card and "T1c" in card

    again = CliRunner().invoke(app, ["run", str(PIPELINE), "--out", str(run_dir), "--resume", *small(tmp_path)])
    assert again.exit_code == 0, again.output
    state = json.loads((run_dir / "state.json").read_text())
    assert all(s["status"] == "done" for s in state["stages"].values())

    # predict straight from an ingest folder (new series, no datalist): the dataset stage's channel rules
    ctx = RunContext(tmp_path, tmp_path / "predict_ingest", 0, "cpu", False, False, {}, logging.getLogger("test"))
    ctx.stage_dir.mkdir()
    out = predict(ctx, PredictParams(checkpoint=str(train / "checkpoint.pt"), ingest_dir=str(stages / "01_ingest")))
    masks = sorted(Path(out.outputs["masks"]).glob("*.nii.gz"))
    assert len(masks) == out.metrics["n_predicted"] == 6
    flair = sorted(Path(stages / "01_ingest" / "volumes").glob("*/*FLAIR*.nii.gz"))
    assert [nib.load(m).shape for m in masks] == [nib.load(f).shape for f in flair]
