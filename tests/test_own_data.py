"""Your own data, end to end through the CLI: NIfTI cases (nnU-Net, Decathlon, CSV) -> import -> train ->
evaluate -> predict with no hand-written datalist; cross-validation of the segmenter with its fold ensemble;
predict writes the masks evaluate scored; medpipe score applies the package's ensemble and post-processing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.data.datalist import load_datalist
from tests.nifti_cases import make_csv, make_msd, make_nnunet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = """\
  - stage: train_segmenter
    {datalist}
    channels: [4, 8]
    strides: [2]
    roi_size: [16, 16, 16]
    target: multiclass
    batch_size: 2
    epochs: {epochs}
    lr: 0.01
    val_every: 1
    {extra}
    package: {{tta: true, min_component_ml: 0.05}}
  - stage: evaluate
    bootstrap: 50
  - stage: predict
"""


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(tmp_path: Path, body: str, name: str = "own") -> tuple[Path, dict]:
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(f"name: {name}\nseed: 0\ncpu_threads: 1\nstages:\n" + body)
    run_dir = tmp_path / f"run_{name}"
    result = CliRunner().invoke(app, ["run", str(pipeline), "--out", str(run_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _check_outputs(run_dir: Path, metrics: dict, datalist: Path) -> None:
    """evaluate scored the test split with the package's TTA and post-processing; predict wrote those masks."""
    doc = load_datalist(datalist)
    stages = run_dir / "stages"
    assert isinstance(metrics["dice"], float) and metrics["tta"] is True and metrics["min_component_ml"] == 0.05
    assert metrics["predict_tta"] is True and metrics["predict_min_component_ml"] == 0.05
    cases = _csv(next(stages.glob("*_evaluate")) / "cases.csv")
    predicted = _csv(next(stages.glob("*_predict")) / "predictions.csv")
    assert len(cases) == len(predicted) == len(doc["test"]) >= 1
    for c, p in zip(cases, predicted, strict=True):
        assert c["patient_id"] == p["patient_id"] and float(c["pred_ml"]) == pytest.approx(float(p["foreground_ml"]))
    for item, p in zip(doc["test"], predicted, strict=True):
        mask, ref = nib.load(p["mask"]), nib.load(item["reference_volume"])
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nnunet", "msd", "csv"])
def test_import_train_evaluate_predict_through_the_cli(tmp_path: Path, fmt: str) -> None:
    """Done when: a small dataset in each layout goes import -> train -> evaluate -> predict with no hand-written
    datalist; evaluate and predict take the datalist the training stage was given."""
    src = {"nnunet": make_nnunet, "msd": make_msd, "csv": make_csv}[fmt](tmp_path, n=8)
    out = tmp_path / "imported"
    imported = CliRunner().invoke(app, ["import", fmt, str(src), "--out", str(out), "--val", "0.25", "--test", "0.25"]
                                  + (["--label-names", "1=edema,2=core"] if fmt == "csv" else []))
    assert imported.exit_code == 0, imported.output
    assert ("resampled onto the FLAIR grid (8)" in imported.output) == (fmt == "csv")
    datalist = out / "datalist.json"
    run_dir, metrics = _run(tmp_path, TRAIN.format(datalist=f"datalist: {datalist}", epochs=3, extra=""), fmt)
    assert metrics["stages"]["00_train_segmenter"]["epochs_run"] == 3
    per_label = metrics["per_label"]
    assert set(per_label) == {"edema", "core"}  # the declared label names name the classes
    _check_outputs(run_dir, metrics, datalist)


@pytest.mark.slow
def test_dataset_stage_source_and_segmenter_cross_validation(tmp_path: Path) -> None:
    """``dataset: {source: ...}`` then ``folds: 2``: per-fold and pooled out-of-fold Dice with CIs, out-of-fold masks,
    and the fold ensemble in evaluate, predict and the model package."""
    src = make_nnunet(tmp_path, n=10)
    body = (f"  - stage: dataset\n    source: {{format: nnunet, path: {src}}}\n"
            "    split: {val: 0.0, test: 0.2}\n") + TRAIN.format(datalist="", epochs=2, extra="folds: 2\n    select: loss\n    average: ema\n    ema_decay: 0.9")
    run_dir, metrics = _run(tmp_path, body, "cv")
    stages = run_dir / "stages"
    train = next(stages.glob("*_train_segmenter"))
    datalist = next(stages.glob("*_dataset")) / "datalist.json"
    doc = load_datalist(datalist)
    assert len(doc["train"]) == 8 and len(doc["test"]) == 2 and not doc["val"]
    assert sorted(p.name for p in train.glob("checkpoint_fold*.pt")) == ["checkpoint_fold0.pt", "checkpoint_fold1.pt"]
    oof = _csv(train / "oof.csv")
    assert sorted(r["patient_id"] for r in oof) == sorted(it["patient_id"] for it in doc["train"])
    assert {r["fold"] for r in oof} == {"0", "1"}
    assert all((train / r["mask"]).is_file() for r in oof)
    cv = json.loads((train / "crossval.json").read_text())
    assert len(cv["folds"]) == 2 and cv["cv_dice_folds"] == [f["dice"] for f in cv["folds"]]
    assert metrics["cv_dice"] == cv["cv_dice"] and len(metrics["cv_dice_ci95"]) == 2
    assert metrics["cv_dice_sd"] is None or metrics["cv_dice_sd"] >= 0
    dice = [float(r["dice_whole_tumour"]) for r in oof if r["dice_whole_tumour"]]
    assert cv["cv_dice"] == pytest.approx(float(np.mean(dice)), abs=1e-5)
    # each case was predicted by the model of the fold it was held out of (trained without it)
    from medpipe.inference.evaluation import score_cases
    from medpipe.inference.segmentation import SegmentationModel
    from medpipe.training.classification import kfold_items
    from medpipe.training.segmentation import has_foreground

    folds = kfold_items(doc["train"], doc["val"], 2, 0, stratum=has_foreground)
    for f, (_, held) in enumerate(folds):
        assert sorted(r["patient_id"] for r in oof if r["fold"] == str(f)) == sorted(it["patient_id"] for it in held)
        model = SegmentationModel.load(train / f"checkpoint_fold{f}.pt")
        first = next(score_cases(model, held[:1]))
        row = next(r for r in oof if r["patient_id"] == held[0]["patient_id"])
        assert float(row["pred_ml"]) == pytest.approx(first.row["pred_ml"])
    assert metrics["ensemble_size"] == 2 and metrics["predict_ensemble_size"] == 2
    from medpipe.inference.package import ModelPackage

    pkg = ModelPackage.load(train / "model")
    assert len(pkg.members) == 2 and pkg.inference["tta"] is True and pkg.inference["min_component_ml"] == 0.05
    assert len(pkg.load_model().nets) == 2
    assert pkg.manifest["training"]["cross_validation"]["cv_dice"] == cv["cv_dice"]
    _check_outputs(run_dir, metrics, datalist)


def test_predict_takes_evaluates_settings_unless_told_otherwise(tmp_path: Path) -> None:
    """evaluate overrides the model's TTA; predict follows evaluate; an explicit predict setting wins."""
    import logging

    from medpipe.data.datalist import datalist_json
    from medpipe.inference.segmentation import SegmentationModel
    from medpipe.stage import RunContext
    from medpipe.stages.evaluate import EvaluateParams, evaluate
    from medpipe.stages.predict import PredictParams, predict
    from tests.scoring_helpers import tiny_segmenter_package

    ds = make_nnunet(tmp_path, n=2)
    pkg = tiny_segmenter_package(tmp_path / "model", rules={"FLAIR": {}, "T1c": {}}, bias=0.5)
    items = [{"image": [str(ds / "imagesTr" / f"synth_{i:03d}_{c:04d}.nii.gz") for c in range(2)],
              "label": str(ds / "labelsTr" / f"synth_{i:03d}.nii.gz"), "patient_id": f"p{i}"} for i in range(2)]
    dl = tmp_path / "dl.json"
    dl.write_text(datalist_json({"channels": ["FLAIR", "T1c"], "train": [], "val": [], "test": items}, dl))
    model = SegmentationModel.load(pkg.members)
    assert model.inference == {"tta": False, "min_component_ml": None}

    def ctx(name: str, artifacts: dict) -> RunContext:
        c = RunContext(tmp_path, tmp_path / name, 0, "cpu", False, False, artifacts, logging.getLogger("t"))
        c.stage_dir.mkdir()
        return c

    base = {"checkpoint": [str(m) for m in pkg.members], "datalist": str(dl)}
    ev = evaluate(ctx("ev", base), EvaluateParams(tta=True, min_component_ml=0.5, bootstrap=0))
    assert ev.metrics["tta"] is True and ev.metrics["min_component_ml"] == 0.5
    after = {**base, "inference": ev.outputs["inference"]}
    assert predict(ctx("p1", after), PredictParams()).metrics["predict_tta"] is True
    assert predict(ctx("p1b", after), PredictParams()).metrics["predict_min_component_ml"] == 0.5
    assert predict(ctx("p2", after), PredictParams(tta=False)).metrics["predict_tta"] is False
    assert predict(ctx("p3", base), PredictParams()).metrics["predict_tta"] is False  # no evaluate: the model's


def test_score_uses_the_packages_ensemble_and_post_processing(tmp_path: Path) -> None:
    from medpipe.data.volumes import read_grid
    from medpipe.scoring.engine import ScoreOptions, score
    from tests.dicom_factory import AXIAL, Geometry, pattern, write_series
    from tests.scoring_helpers import tiny_segmenter_package

    src = tmp_path / "src"
    write_series(src / "a", pattern((20, 16, 10), seed=0, noise=200), Geometry(iop=AXIAL, origin=(0.0, 0.0, 0.0)),
                 modality="CT", patient_id="P1", tag="a", seed=0)
    masks = {}
    for name, kw in {"m0": {"members": 1}, "m1": {"members": 1, "seed": 1}, "both": {"members": 2},
                     "pruned": {"members": 2, "min_component_ml": 1e5}}.items():
        pkg = tiny_segmenter_package(tmp_path / name, bias=1.0, **kw)  # type: ignore[arg-type]
        report = score(src, pkg, tmp_path / f"out_{name}", ScoreOptions(nifti=True, cpu_threads=1))
        assert report.counts.get("ok") == 1, report.rows
        masks[name] = np.asarray(nib.load(next((tmp_path / f"out_{name}").rglob("mask.nii.gz"))).dataobj)
    # the two-member package scores with the mean of both networks, which neither gives alone
    from medpipe.inference.package import ModelPackage
    from medpipe.inference.segmentation import SegmentationModel

    both = ModelPackage.load(tmp_path / "both")
    volume = next((tmp_path / "out_both" / "ingest").rglob("*.nii.gz"))
    model = SegmentationModel.load(both.members)
    data = model.transforms(labelled=False)({"image": [str(volume)]})
    expected = model.segment(data, read_grid(volume)).mask
    assert np.array_equal(masks["both"], expected)
    assert masks["both"].any() and not np.array_equal(masks["both"], masks["m0"])
    assert not np.array_equal(masks["both"], masks["m1"])
    assert not masks["pruned"].any()  # every component is below 1e5 mL: the package's post-processing applied


@pytest.mark.slow
def test_the_readme_yaml_goes_from_a_nifti_folder_to_cross_validated_dice(tmp_path: Path) -> None:
    """The YAML of the README's 'Use your own data' section, as a user copies it (only the path changed), shrunk
    with --set to test size."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### From a folder of NIfTI cases"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    block = section[start:section.index("```", start)]
    assert "/data/Dataset001_BrainTumour" in block and "folds: 5" in block
    src = make_nnunet(tmp_path, n=10)
    pipeline = tmp_path / "my.yaml"
    pipeline.write_text(block.replace("/data/Dataset001_BrainTumour", str(src)))
    shrink = {"folds": 2, "epochs": 2, "val_every": 1, "min_epochs": 1, "roi_size": [16, 16, 16], "channels": [4, 8],
              "strides": [2]}
    sets = [a for k, v in shrink.items() for a in ("--set", f"train_segmenter.{k}={json.dumps(v)}")]
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(pipeline), "--out", str(run_dir), "--device", "cpu", *sets])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert isinstance(metrics["cv_dice"], float) and len(metrics["cv_dice_folds"]) == 2
    assert isinstance(metrics["dice"], float) and metrics["ensemble_size"] == 2 and metrics["n_predicted"] == 2
