"""Classifiers: every network trains, imbalance options do what they claim, synthetic data stays in
train, and the train / evaluate stages work end to end on real BreastMNIST images."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medpipe.data.datalist import class_items
from medpipe.errors import StageError
from medpipe.inference.checkpoint import load_ensemble
from medpipe.models.classification import SliceSequenceClassifier, build_classifier, check_input_size, classifier_config
from medpipe.runner import seed_everything
from medpipe.stage import RunContext
from medpipe.stages.evaluate_classifier import EvaluateClassifierParams, evaluate_classifier
from medpipe.stages.train_classifier import TrainClassifierParams, train_classifier
from medpipe.training.classification import kfold_items
from medpipe.training.imbalance import inverse_frequency_weights, make_sampler, sample_weights
from medpipe.training.losses import make_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ctx(tmp_path: Path, name: str, artifacts: dict[str, Any], seed: int = 0) -> RunContext:
    stage_dir = tmp_path / "stages" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, False)
    return RunContext(tmp_path, stage_dir, seed, "cpu", False, False, dict(artifacts), logging.getLogger(f"test.{name}"))


# -- networks ------------------------------------------------------------------------------------------

NETWORKS = [
    ("resnet18", 2, (1, 28, 28), {"stem": "small", "widen_factor": 0.25}),
    ("resnet34", 2, (3, 32, 32), {"widen_factor": 0.25}),
    ("resnet50", 3, (1, 16, 16, 16), {"stem": "small", "stem_stride": 2, "widen_factor": 0.125}),
    ("densenet121", 2, (1, 32, 32), {}),
    ("efficientnet-b0", 2, (2, 32, 32), {}),
    ("resnet18", 3, (4, 16, 16, 8), {"stem": "small", "widen_factor": 0.125}),
    ("cnn_rnn", 3, (2, 16, 16, 6), {"encoder": "resnet10", "stem": "small", "widen_factor": 0.125, "rnn": "lstm"}),
]


@pytest.mark.parametrize(("name", "dims", "shape", "extra"), NETWORKS, ids=[f"{n[0]}-{n[1]}d" for n in NETWORKS])
def test_each_network_builds_and_learns_a_few_steps(name: str, dims: int, shape: tuple[int, ...],
                                                    extra: dict[str, Any]) -> None:
    torch.manual_seed(0)
    cfg = classifier_config(name, dims, shape[0], 3, **extra)
    assert json.loads(json.dumps(cfg)) == cfg  # stored in checkpoints
    net = build_classifier(cfg)
    check_input_size(net, shape)
    x = torch.randn(4, *shape)
    y = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    net.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and min(losses[1:]) < losses[0]
    net.eval()
    assert net(x[:1]).shape == (1, 3)


def test_too_small_images_get_an_actionable_error() -> None:
    net = build_classifier(classifier_config("densenet121", 2, 1, 2))
    with pytest.raises(ValueError, match="Resized transform"):
        check_input_size(net, (1, 28, 28))
    with pytest.raises(ValueError, match="needs 3D"):
        classifier_config("cnn_rnn", 2, 1, 2)


def test_cnn_rnn_attends_over_slices() -> None:
    torch.manual_seed(0)
    net = build_classifier(classifier_config("cnn_rnn", 3, 1, 2, encoder="resnet10", stem="small", widen_factor=0.125))
    assert isinstance(net, SliceSequenceClassifier)
    net.eval()
    x = torch.randn(2, 1, 16, 16, 5)
    out = net(x)
    assert out.shape == (2, 2)
    att = net.last_attention
    assert att is not None and att.shape == (2, 5) and torch.allclose(att.sum(1), torch.ones(2))
    # slices are independent inputs to the encoder: permuting them changes the sequence the RNN reads
    assert not torch.allclose(net(x.flip(-1)), out)


# -- imbalance -----------------------------------------------------------------------------------------


def test_weighted_sampler_draws_classes_equally_often() -> None:
    classes = [0] * 90 + [1] * 10
    counts = np.bincount(classes)
    assert sample_weights(classes, counts)[0] == pytest.approx(1 / 90)
    sampler = make_sampler("weighted_sampler", classes, counts, seed=0)
    drawn = [classes[i] for _ in range(50) for i in sampler]
    assert len(drawn) == 5000 and 0.45 < np.mean(drawn) < 0.55  # 10 % minority -> about half the draws
    assert make_sampler("class_weights", classes, counts, seed=0) is None


def test_class_weights_are_inverse_frequency_and_weight_the_loss() -> None:
    counts = np.array([30, 10])
    w = inverse_frequency_weights(counts)
    assert w.tolist() == pytest.approx([40 / 60, 40 / 20])
    assert inverse_frequency_weights(np.array([5, 5])).tolist() == [1.0, 1.0]
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([1, 0])  # both wrong
    plain = make_loss("none", counts)(logits, y)
    weighted = make_loss("class_weights", counts)
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (per * torch.tensor([w[1], w[0]], dtype=torch.float32)).sum() / (w[1] + w[0])
    assert float(weighted(logits, y)) == pytest.approx(float(expected), rel=1e-5)
    # the minority (class 1) error now costs 3x the majority error
    assert float(make_loss("class_weights", counts)(logits[:1], y[:1])) == pytest.approx(float(per[0]), rel=1e-5)
    assert float(plain) == pytest.approx(float(per.mean()), rel=1e-5)


def test_focal_loss_down_weights_easy_examples() -> None:
    counts = np.array([10, 10])
    focal, ce = make_loss("focal", counts, gamma=2.0), make_loss("none", counts)
    easy = (torch.tensor([[4.0, -4.0]]), torch.tensor([0]))
    hard = (torch.tensor([[-1.0, 1.0]]), torch.tensor([0]))
    easy_ratio = float(focal(*easy)) / float(ce(*easy))
    hard_ratio = float(focal(*hard)) / float(ce(*hard))
    assert easy_ratio < 1e-3 and hard_ratio > 0.3  # easy examples lose almost all their weight, hard ones keep it
    p = torch.softmax(hard[0], 1)[0, 0]
    assert float(focal(*hard)) == pytest.approx(float(-((1 - p) ** 2) * torch.log(p)) / 2, rel=1e-4)  # MONAI averages over the 2 classes


# -- synthetic data ------------------------------------------------------------------------------------


def test_synthetic_items_are_refused_outside_train(tmp_path: Path) -> None:
    real = [{"image": f"r{i}.png", "class": i % 2, "patient_id": f"p{i}"} for i in range(6)]
    fake = [{"image": f"s{i}.png", "class": 0, "synthetic": True, "patient_id": f"synthetic-{i}"} for i in range(4)]
    doc = {"train": real[:4] + fake, "val": real[4:], "test": [real[5], fake[0]]}
    assert len(class_items(doc, "train", path=tmp_path)) == 8
    with pytest.raises(StageError, match="synthetic item"):
        class_items(doc, "test", path=tmp_path)
    for fold_train, fold_val in kfold_items(doc["train"], doc["val"], 3, seed=0):
        assert not any(it.get("synthetic") for it in fold_val)
        assert sum(1 for it in fold_train if it.get("synthetic")) == 4


# -- real data: BreastMNIST ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breastmnist(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real BreastMNIST import, cut down to 64 train / 24 val / 32 test images (both classes in each)."""
    from medpipe.data.medmnist import import_medmnist

    out = tmp_path_factory.mktemp("breastmnist")
    summary = import_medmnist(shared_data / "breastmnist" / "breastmnist.npz", out / "full")
    doc = json.loads(summary.datalist.read_text())
    for split, n in (("train", 64), ("val", 24), ("test", 32)):
        by_class = [[it for it in doc[split] if it["class"] == c] for c in (0, 1)]
        doc[split] = by_class[0][: n // 3] + by_class[1][: n - n // 3]
    small = out / "datalist.json"
    small.write_text(json.dumps(doc))
    return small


TINY = {"model": "resnet18", "stem": "small", "stem_stride": 2, "widen_factor": 0.125, "batch_size": 16,
        "epochs": 3, "lr": 0.003}


def test_train_and_evaluate_on_real_breastmnist(tmp_path: Path, breastmnist: Path) -> None:
    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(breastmnist)})
    result = train_classifier(ctx, TrainClassifierParams(**TINY, imbalance="weighted_sampler"))
    (ckpt,) = result.outputs["classifier"]
    assert Path(ckpt).name == "checkpoint.pt" and 0.0 <= result.metrics["best_val_auc"] <= 1.0
    assert result.metrics["n_train"] == 64 and result.metrics["epochs_trained"] == 3
    for f in ("history.csv", "curve.png"):
        assert (ctx.stage_dir / f).stat().st_size > 0
    _nets, doc = load_ensemble([ckpt], "cpu")
    assert doc["class_names"] == {"0": "malignant", "1": "normal, benign"} and doc["input_shape"] == [1, 28, 28]
    assert doc["imbalance"] == "weighted_sampler" and doc["n_synthetic"] == 0

    ectx = _ctx(tmp_path, "02_evaluate_classifier", {"datalist": str(breastmnist), **result.outputs})
    ev = evaluate_classifier(ectx, EvaluateClassifierParams(positive_class=0, tta=True, bootstrap=200))
    m = ev.metrics
    assert m["n_cases"] == 32 and m["n_per_class"] == [10, 22] and m["positive_class"] == "malignant"
    assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 and m["tta"] is True
    # Guards: a broken model (or labels shuffled against images) scoring at chance: 3 tiny epochs on 64 real
    # images reach AUC ~0.71 here; 0.6 leaves room for floating-point differences between machines
    assert m["auc"] > 0.6
    assert m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    for f in ("roc.png", "confusion.png", "calibration.png", "metrics.json"):
        assert (ectx.stage_dir / f).read_bytes()[:4] in (b"\x89PNG", b"{\n \"")
    rows = list(csv.DictReader((ectx.stage_dir / "predictions.csv").open()))
    assert len(rows) == 32
    # the CSV agrees with the reported accuracy and holds probabilities that sum to one
    assert np.mean([int(r["correct"]) for r in rows]) == pytest.approx(m["accuracy"])
    assert all(abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-4 for r in rows)
    # Guards: sensitivity, specificity, PPV, NPV and F1 of the wrong class. Recomputed from the CSV for the
    # positive class asked for (malignant, 0)
    true = np.array([int(r["true"]) for r in rows]) == 0
    pred = np.array([int(r["predicted"]) for r in rows]) == 0
    tp, fn = int((pred & true).sum()), int((~pred & true).sum())
    tn, fp = int((~pred & ~true).sum()), int((pred & ~true).sum())

    def ratio(a: int, b: int) -> float | None:
        return None if b == 0 else a / b

    expected = {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
                "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}
    for key, value in expected.items():
        assert (m[key] is None) if value is None else m[key] == pytest.approx(value, abs=1e-6), key
    assert tp + fn == 10, "malignant is the positive class"


def test_kfold_training_gives_an_ensemble(tmp_path: Path, breastmnist: Path) -> None:
    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(breastmnist)})
    result = train_classifier(ctx, TrainClassifierParams(**{**TINY, "epochs": 1}, folds=2, imbalance="focal"))
    ckpts = result.outputs["classifier"]
    assert [Path(c).name for c in ckpts] == ["checkpoint_fold0.pt", "checkpoint_fold1.pt"]
    assert result.metrics["n_train"] + result.metrics["n_val"] == 64 + 24  # train and val pooled, then folded
    assert "oof_auc" in result.metrics
    ectx = _ctx(tmp_path, "02_evaluate_classifier", {"datalist": str(breastmnist), **result.outputs})
    ev = evaluate_classifier(ectx, EvaluateClassifierParams(bootstrap=0))
    assert ev.metrics["ensemble_size"] == 2


def test_kfold_threshold_is_chosen_out_of_fold_and_used_downstream(tmp_path: Path, breastmnist: Path) -> None:
    """threshold_rule: the decision threshold is chosen on the out-of-fold predictions (with the package's TTA and
    the averaged weights), recorded in every checkpoint and the package, and evaluate_classifier decides with it."""
    from medpipe.data.datalist import model_inputs
    from medpipe.data.datasets import make_dataset
    from medpipe.inference.classification import ClassificationModel
    from medpipe.inference.package import ModelPackage
    from medpipe.metrics.classification import choose_threshold

    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(breastmnist)})
    params = TrainClassifierParams(**{**TINY, "epochs": 2}, folds=2, threshold_rule="accuracy", average="ema",
                                   ema_decay=0.8, package={"tta": True, "positive_class": 0})
    result = train_classifier(ctx, params)
    rows = list(csv.DictReader((ctx.stage_dir / "oof.csv").open()))
    assert len(rows) == 64 + 24 and {r["fold"] for r in rows} == {"0", "1"}
    y = np.array([int(r["true"]) for r in rows])
    prob = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    t = result.metrics["oof_threshold"]
    assert t == pytest.approx(choose_threshold(y, prob, positive=0, rule="accuracy"), abs=1e-6)
    assert result.metrics["oof_accuracy"] == pytest.approx(np.mean(np.where(prob[:, 0] >= t, 0, 1) == y), abs=1e-6)
    ckpts = result.outputs["classifier"]
    model = ClassificationModel.load(ckpts[1])
    assert model.decision == (0, pytest.approx(t)) and model.tta_axes == [0]
    # fold 1's rows are its own held-out items, scored with the package's flip TTA
    doc = json.loads(breastmnist.read_text())
    by_case = {r["case"]: r for r in rows if r["fold"] == "1"}
    from medpipe.data.datalist import case_name

    held = [it for it in [*doc["train"], *doc["val"]] if case_name(it) in by_case][:4]
    again = model.predict_proba(make_dataset(model_inputs(held), model.eval_transforms, "none"), tta_axes=[0])
    assert np.allclose(again[:, 0], [float(by_case[case_name(it)]["prob_0"]) for it in held], atol=1e-5)
    pkg = ModelPackage.load(result.outputs["model"])
    assert pkg.outputs["threshold"] == pytest.approx(t) and pkg.outputs["positive_class"] == 0
    assert result.outputs["datalist"] == str(breastmnist)

    ectx = _ctx(tmp_path, "02_evaluate_classifier", {"datalist": str(breastmnist), **result.outputs})
    m = evaluate_classifier(ectx, EvaluateClassifierParams(bootstrap=0)).metrics
    assert m["threshold"] == pytest.approx(t) and m["positive_class"] == "malignant" and m["tta"] is True
    ectx2 = _ctx(tmp_path, "03_evaluate_classifier", {"datalist": str(breastmnist), **result.outputs})
    m2 = evaluate_classifier(ectx2, EvaluateClassifierParams(bootstrap=0, positive_class=1)).metrics
    assert m2["threshold"] == pytest.approx(1 - t) and m2["accuracy"] == pytest.approx(m["accuracy"], abs=0.04)
    ectx3 = _ctx(tmp_path, "04_evaluate_classifier", {"datalist": str(breastmnist), **result.outputs})
    assert evaluate_classifier(ectx3, EvaluateClassifierParams(bootstrap=0, threshold=0.5)).metrics["threshold"] == 0.5


def test_evaluate_refuses_a_synthetic_test_item(tmp_path: Path, breastmnist: Path) -> None:
    doc = json.loads(breastmnist.read_text())
    doc["test"].append({**doc["train"][0], "synthetic": True})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(bad)})
    with pytest.raises(StageError, match="synthetic"):
        evaluate_classifier(ctx, EvaluateClassifierParams(checkpoints=[str(bad)]))


# -- 3D: volumes and the slice-sequence model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 two-channel 20x20x8 NIfTI volumes; class 1 has a bright blob in a few slices."""
    import nibabel as nib

    out = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    doc: dict[str, Any] = {"class_names": {"0": "no tumour", "1": "tumour"}, "train": [], "val": [], "test": []}
    for i in range(24):
        c = i % 2
        files = []
        for ch in range(2):
            v = rng.normal(1.0, 0.1, (20, 20, 8)).astype(np.float32)
            if c:
                v[6:12, 8:14, 2:5] += 2.0
            f = out / f"case{i:02d}_ch{ch}.nii.gz"
            nib.save(nib.Nifti1Image(v, np.diag([2.0, 2.0, 4.0, 1.0])), str(f))
            files.append(str(f))
        split = "train" if i < 16 else "val" if i < 20 else "test"
        doc[split].append({"image": files, "class": c, "patient_id": f"p{i:02d}", "study_uid": f"s{i}"})
    path = out / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("model", ["resnet18", "cnn_rnn"])
def test_3d_classifiers_train_on_volumes(tmp_path: Path, volumes: Path, model: str) -> None:
    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(volumes)})
    p = TrainClassifierParams(model=model, spatial_size=(16, 16, 8), stem="small", widen_factor=0.125,
                              encoder="resnet10", batch_size=4, epochs=2, imbalance="class_weights")
    result = train_classifier(ctx, p)
    _, doc = load_ensemble(result.outputs["classifier"], "cpu")
    assert doc["input_shape"] == [2, 16, 16, 8] and doc["model"]["spatial_dims"] == 3
    ev = evaluate_classifier(_ctx(tmp_path, "02_evaluate_classifier", {"datalist": str(volumes), **result.outputs}),
                             EvaluateClassifierParams(tta=True, bootstrap=50))
    assert ev.metrics["n_cases"] == 4


def test_cnn_rnn_refuses_2d_images(tmp_path: Path, breastmnist: Path) -> None:
    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(breastmnist)})
    with pytest.raises(StageError, match="cnn_rnn needs volumes"):
        train_classifier(ctx, TrainClassifierParams(model="cnn_rnn", epochs=1))


def test_items_with_different_extra_keys_train_together(tmp_path: Path, breastmnist: Path) -> None:
    """Synthetic items carry keys real ones lack; MONAI's collate must not see them (it keys on the first item)."""
    doc = json.loads(breastmnist.read_text())
    doc["train"] = [{**it, "synthetic": True, "generator": "g.pt"} if i % 3 == 0 else it
                    for i, it in enumerate(doc["train"])]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(doc))
    ctx = _ctx(tmp_path, "01_train_classifier", {"datalist": str(mixed)})
    result = train_classifier(ctx, TrainClassifierParams(**{**TINY, "epochs": 1}))
    assert result.metrics["n_synthetic_train"] == 22
