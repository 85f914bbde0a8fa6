"""Segmentation stages on tiny synthetic volumes: networks, training, scoring, prediction geometry."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medpipe.data import labels as seg
from medpipe.inference import checkpoint as checkpoint_mod
from medpipe.inference.checkpoint import SEGMENTER_FORMAT
from medpipe.metrics.bootstrap import bootstrap_ci
from medpipe.metrics.segmentation import dice_hd95
from medpipe.models.segmentation import (
    build_from_config,
    build_segmenter,
    segmenter_config,
)
from medpipe.runner import seed_everything
from medpipe.stage import RunContext
from medpipe.stages.evaluate import EvaluateParams, evaluate
from medpipe.stages.predict import PredictParams, predict
from medpipe.stages.train_segmenter import TrainSegmenterParams, train_segmenter

KEYS = ["image", "label"]
#: like medpipe ingest's volumes: x runs right -> left (dcm2niix layout), not RAS
AFFINE = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -20.0], [0, 0, 3.0, -15.0], [0, 0, 0, 1]])
SHAPE = (28, 24, 12)
# no resampling, but reorientation and a crop: the geometry must come back exactly
EXACT_EVAL = [
    {"LoadImaged": {"keys": KEYS}},
    {"EnsureChannelFirstd": {"keys": KEYS}},
    {"Orientationd": {"keys": KEYS, "axcodes": "RAS"}},
    {"NormalizeIntensityd": {"keys": "image", "channel_wise": True}},
    {"CropForegroundd": {"keys": KEYS, "source_key": "image", "margin": 1, "allow_smaller": True}},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path: Path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return str(path)


def _case(folder: Path, name: str, rng: np.random.Generator, tumour: bool) -> dict[str, Any]:
    """A 'head' (box) with an optional two-label 'tumour' (ball, core label 1 + rim label 2); 2 channels."""
    idx = np.indices(SHAPE).astype(np.float32)
    head = np.zeros(SHAPE, bool)
    head[3:-3, 3:-3, 1:-1] = True
    label = np.zeros(SHAPE, np.uint8)
    if tumour:
        c = rng.uniform([9, 8, 4], [19, 16, 8])
        r = np.sqrt(((idx - c[:, None, None, None]) ** 2 * np.array([1, 1, 2.25])[:, None, None, None]).sum(0))
        label[(r < 4.5) & head] = 2
        label[(r < 2.5) & head] = 1
    ch0 = 100 * head + 300 * (label > 0) + rng.normal(0, 5, SHAPE)  # "FLAIR": tumour bright
    ch1 = 80 * head - 40 * (label == 1) + rng.normal(0, 5, SHAPE)  # "T1": core dark
    folder.mkdir(parents=True, exist_ok=True)
    images = [_write(folder / f"{name}_{c}.nii.gz", a.astype(np.float32)) for c, a in (("FLAIR", ch0), ("T1", ch1))]
    return {"image": images, "label": _write(folder / f"{name}_label.nii.gz", label), "class": None,
            "patient_id": name, "study_uid": f"1.2.3.{name[-1]}", "reference_series_uid": f"1.2.4.{name[-1]}",
            "reference_volume": images[0]}


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg_data")
    rng = np.random.default_rng(0)
    cases = [_case(root / "vol", f"P{i}", rng, tumour=i != 4) for i in range(6)]
    doc = {"channels": ["FLAIR", "T1"], "reference": "FLAIR", "label_names": {"1": "core", "2": "rim"},
           "train": cases[:3], "val": cases[3:4], "test": cases[4:]}
    path = root / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


def _ctx(tmp_path: Path, name: str, artifacts: dict[str, Any]) -> RunContext:
    stage_dir = tmp_path / "stages" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0, False)
    return RunContext(tmp_path, stage_dir, 0, "cpu", False, False, dict(artifacts), logging.getLogger(f"test.{name}"))


TINY = {"channels": (4, 8), "strides": (2,), "roi_size": (16, 16, 8), "batch_size": 1}


# -- networks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "segresnet"])
def test_build_segmenter_both_models(name: str) -> None:
    net = build_segmenter(name, 2, 3, channels=(4, 8), strides=(2,))
    out = net(torch.zeros(1, 2, 16, 16, 8))
    assert out.shape == (1, 3, 16, 16, 8)
    cfg = segmenter_config(name, 2, 3, channels=(4, 8))
    assert json.loads(json.dumps(cfg)) == cfg  # JSON-able: stored in checkpoints and outputs
    rebuilt = build_from_config(cfg)
    rebuilt.load_state_dict(net.state_dict())


def test_build_segmenter_rejects_bad_configs() -> None:
    with pytest.raises(ValueError, match="strides"):
        build_segmenter("unet", 1, 2, channels=(4, 8, 16), strides=(2,))
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("vnet", 1, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        build_segmenter("unet", 1, 2, chanels=(4, 8))


# -- parameters and labels -----------------------------------------------------------------------------


def test_params_fill_transform_defaults_and_forbid_typos() -> None:
    p = TrainSegmenterParams(roi_size=(32, 32, 16))
    crop = next(t for t in p.train_transforms or [] if "RandCropByPosNegLabeld" in t)["RandCropByPosNegLabeld"]
    assert crop["spatial_size"] == [32, 32, 16] and crop["num_samples"] == 2
    assert p.eval_transforms and "LoadImaged" in p.eval_transforms[0]
    with pytest.raises(ValidationError, match="extra"):
        TrainSegmenterParams(epoch=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="label_map"):
        TrainSegmenterParams(label_map={1: 1})
    with pytest.raises(ValidationError):
        TrainSegmenterParams(train_transforms=[{"RandCropByPosNegLabel": {"keys": KEYS}}])  # not a MONAI transform


def test_label_mapping() -> None:
    names = {"1": "necrotic core", "2": "edema", "3": "enhancing tumor"}
    lab = np.array([0, 1, 2, 3, 3])
    whole = seg.label_info("whole_tumor", None, names)
    assert seg.n_classes(whole) == 2 and seg.map_labels(lab, whole).tolist() == [0, 1, 1, 1, 1]
    multi = seg.label_info("multiclass", None, names)
    assert seg.n_classes(multi) == 4 and seg.map_labels(torch.tensor(lab), multi).tolist() == [0, 1, 2, 3, 3]
    merged = seg.label_info("multiclass", {1: 1, 3: 1, 2: 2}, names)  # tumour core = necrosis + enhancing
    assert merged["classes"] == {"1": "necrotic core + enhancing tumor", "2": "edema"}
    assert seg.map_labels(lab, merged).tolist() == [0, 1, 2, 1, 1]
    assert seg.map_labels(torch.tensor(lab, dtype=torch.float32), merged).tolist() == [0, 1, 2, 1, 1]


# -- metrics -------------------------------------------------------------------------------------------


def test_dice_hd95_match_numpy() -> None:
    rng = np.random.default_rng(1)
    truth = np.zeros((20, 20, 10), np.uint8)
    truth[5:12, 6:14, 2:7] = 1
    pred = np.roll(truth, 2, axis=0)
    pred[rng.random(pred.shape) < 0.02] = 1
    hand = 2 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())
    d, h = dice_hd95(pred, truth, [1], spacing=(1.0, 1.0, 2.0))[1]
    assert d == pytest.approx(hand, abs=1e-6)
    # HD95 against an independent computation (surface distances with scipy, in mm)
    from tests.test_metrics_segmentation import _reference_hd

    assert h == pytest.approx(_reference_hd(pred, truth, (1.0, 1.0, 2.0), 95), abs=1e-4)
    assert dice_hd95(truth, truth, [1], (1, 1, 1))[1] == (1.0, 0.0)
    empty = np.zeros_like(truth)
    d, h = dice_hd95(pred, empty, [1], (1, 1, 1))[1]  # no truth: undefined (false positives counted apart)
    assert math.isnan(d) and math.isnan(h)


def test_bootstrap_ci_contains_the_mean_and_is_seeded() -> None:
    values = [0.91, 0.85, 0.88, 0.95, 0.79, float("nan")]
    lo, hi = bootstrap_ci(values, seed=3)
    mean = float(np.nanmean(values))
    assert lo < mean < hi and 0.79 <= lo and hi <= 0.95
    assert bootstrap_ci(values, seed=3) == (lo, hi)
    assert all(math.isnan(x) for x in bootstrap_ci([0.5], seed=0))  # one case: undefined, not [0.5, 0.5]
    assert all(math.isnan(x) for x in bootstrap_ci(values, seed=0, n=0))
    assert all(math.isnan(x) for x in bootstrap_ci([], seed=0))


# -- the stages ---------------------------------------------------------------------------------------


def test_train_writes_checkpoint_curve_and_history(tmp_path: Path, datalist: Path) -> None:
    ctx = _ctx(tmp_path, "02_train_segmenter", {"datalist": str(datalist)})
    p = TrainSegmenterParams(**TINY, epochs=2, val_every=1, eval_transforms=EXACT_EVAL)
    result = train_segmenter(ctx, p)
    ck = torch.load(result.outputs["checkpoint"], weights_only=True)
    assert ck["format"] == SEGMENTER_FORMAT and ck["channels"] == ["FLAIR", "T1"]
    assert ck["labels"]["classes"] == {"1": "whole tumour"} and ck["model"]["out_channels"] == 2
    assert ck["eval_transforms"] == EXACT_EVAL and ck["roi_size"] == [16, 16, 8]
    net = build_from_config(ck["model"])
    net.load_state_dict(ck["state_dict"])
    assert ck["model"]["name"] == "unet"
    assert set(result.metrics) >= {"best_val_dice", "epochs_run", "train_seconds"}
    assert result.metrics["epochs_run"] == 2 and 0.0 <= result.metrics["best_val_dice"] <= 1.0
    assert (ctx.stage_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((ctx.stage_dir / "history.csv").read_text().splitlines()) == 3
    assert str(datalist) in result.inputs


def test_train_segresnet_multiclass_with_early_stop(tmp_path: Path, datalist: Path) -> None:
    ctx = _ctx(tmp_path, "02_train_segmenter", {"datalist": str(datalist)})
    p = TrainSegmenterParams(**{**TINY, "model": "segresnet", "strides": None}, target="multiclass", epochs=6,
                             val_every=1, patience=1, lr=1e-6, cache="none")
    result = train_segmenter(ctx, p)
    ck = torch.load(result.outputs["checkpoint"], weights_only=True)
    assert ck["labels"]["classes"] == {"1": "core", "2": "rim"} and ck["model"]["out_channels"] == 3
    assert result.metrics["epochs_run"] < 6 and result.metrics["stopped_early"]


class _Oracle(torch.nn.Module):
    """A 'network' that segments perfectly: channel 0 (tumour bright) above a threshold, shifted by ``shift``."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] > 2.0).float()  # z-scored: the tumour is far above the head's mean
        if self.shift:
            fg = torch.roll(fg, self.shift, dims=2)
        return torch.cat([1 - fg, fg], 1) * 10


def _oracle_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eval_transforms: list, shift: int = 0,
                       roi: tuple[int, int, int] = (16, 16, 8)) -> Path:
    doc = {"format": SEGMENTER_FORMAT, "version": 1, "model": {}, "channels": ["FLAIR", "T1"],
           "labels": seg.label_info("whole_tumor", None, None), "roi_size": list(roi),
           "eval_transforms": eval_transforms}
    path = tmp_path / "oracle.pt"
    path.write_bytes(b"not read")

    def fake_load(p: Path, device: str) -> tuple[torch.nn.Module, dict]:
        return _Oracle(shift).eval(), doc

    monkeypatch.setattr(checkpoint_mod, "load_segmenter", fake_load)
    return path


def test_evaluate_perfect_model_scores_one_on_the_source_grid(tmp_path: Path, datalist: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ck = _oracle_checkpoint(monkeypatch, tmp_path, EXACT_EVAL)
    ctx = _ctx(tmp_path, "03_evaluate", {"datalist": str(datalist), "checkpoint": str(ck)})
    m = evaluate(ctx, EvaluateParams(bootstrap=200, tta=True)).metrics
    # one case with tumour: the interval is undefined (null), not [1.0, 1.0]
    assert m["dice"] == pytest.approx(1.0) and m["dice_ci95"] == [None, None]
    assert m["hd95"] == pytest.approx(0.0) and m["n_cases"] == 2 and m["n_with_tumour"] == 1
    assert m["false_positive_cases"] == 0 and m["per_label"]["whole tumour"]["dice"] == pytest.approx(1.0)
    rows = (ctx.stage_dir / "cases.csv").read_text().splitlines()
    assert rows[0].startswith("patient_id,study_uid,has_tumour,dice_whole_tumour") and len(rows) == 3
    assert len(list((ctx.stage_dir / "overlays").glob("*.png"))) == 2


def test_evaluate_dice_equals_hand_computation(tmp_path: Path, datalist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = EXACT_EVAL[:2] + EXACT_EVAL[3:4]  # model grid == source grid: the shift is known in source voxels
    ck = _oracle_checkpoint(monkeypatch, tmp_path, plain, shift=2, roi=SHAPE)
    doc = json.loads(datalist.read_text())
    doc["test"], doc["train"] = doc["train"], doc["test"]  # three cases, all with tumour (one split per patient)
    dl = tmp_path / "datalist3.json"
    dl.write_text(json.dumps(doc))
    ctx = _ctx(tmp_path, "03_evaluate", {"datalist": str(dl), "checkpoint": str(ck)})
    m = evaluate(ctx, EvaluateParams(bootstrap=500, overlays=0)).metrics
    hand = []
    for it in doc["test"]:
        t = np.asarray(nib.load(it["label"]).dataobj) > 0
        img = np.asarray(nib.load(it["image"][0]).dataobj)
        z = (img - img.mean()) / img.std()
        p = np.roll(z > 2.0, 2, axis=0)
        hand.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert m["dice"] == pytest.approx(np.mean(hand), abs=1e-5)
    assert 0.2 < m["dice"] < 0.95
    lo, hi = m["dice_ci95"]
    assert lo <= m["dice"] <= hi and lo >= min(hand) - 1e-6 and hi <= max(hand) + 1e-6


@pytest.mark.parametrize("resample", [False, True])
def test_predict_writes_masks_on_the_reference_grid(tmp_path: Path, datalist: Path, monkeypatch: pytest.MonkeyPatch,
                                                    resample: bool) -> None:
    spec = list(EXACT_EVAL)
    if resample:  # a coarser model grid: the mask must still land on the reference grid
        spec.insert(3, {"Spacingd": {"keys": KEYS, "pixdim": [3.0, 3.0, 3.0], "mode": ["bilinear", "nearest"]}})
    ck = _oracle_checkpoint(monkeypatch, tmp_path, spec)
    ctx = _ctx(tmp_path, "04_predict", {"datalist": str(datalist), "checkpoint": str(ck)})
    result = predict(ctx, PredictParams(split="all"))
    masks = sorted(Path(result.outputs["masks"]).glob("*.nii.gz"))
    doc = json.loads(datalist.read_text())
    items = doc["train"] + doc["val"] + doc["test"]
    assert len(masks) == len(items) == result.metrics["n_predicted"]
    for it in items:
        ref = nib.load(it["reference_volume"])
        out = nib.load(next(m for m in masks if m.name.startswith(it["patient_id"] + "_")))
        assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
        pred = np.asarray(out.dataobj)
        truth = np.asarray(nib.load(it["label"]).dataobj) > 0
        assert pred.dtype == np.uint8
        if not truth.any():
            assert not pred.any()
        elif resample:
            assert 2 * ((pred > 0) & truth).sum() / ((pred > 0).sum() + truth.sum()) > 0.75
        else:
            assert np.array_equal(pred > 0, truth)
    assert (ctx.stage_dir / "predictions.csv").read_text().startswith("patient_id,study_uid,reference_series_uid")


def test_predict_needs_a_checkpoint(tmp_path: Path, datalist: Path) -> None:
    from medpipe.errors import StageError

    ctx = _ctx(tmp_path, "04_predict", {"datalist": str(datalist)})
    with pytest.raises(StageError, match="checkpoint: not given, and no earlier stage gives .checkpoint."):
        predict(ctx, PredictParams())
