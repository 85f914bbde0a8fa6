"""Explanation maps (Grad-CAM, Grad-CAM++, occlusion) for every classifier, and the ``explain`` stage."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medpipe.data.transform_defaults import classifier_eval_transforms
from medpipe.errors import StageError
from medpipe.inference.checkpoint import write_classifier_checkpoint
from medpipe.models.classification import build_classifier
from medpipe.models.classification_config import classifier_config
from medpipe.models.explain import METHODS, Explainer, explain, hooked_cams, normalize, occlusion_settings
from medpipe.report.explanation_plots import choose_slices, explanation_png
from medpipe.runner import seed_everything
from medpipe.stage import RunContext
from medpipe.stages.explain import ExplainParams
from medpipe.stages.explain import explain as explain_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL: dict[str, Any] = {"stem": "small", "widen_factor": 0.125}


def _ctx(tmp_path: Path, name: str, artifacts: dict[str, Any]) -> RunContext:
    stage_dir = tmp_path / "stages" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0, False)
    return RunContext(tmp_path, stage_dir, 0, "cpu", False, False, dict(artifacts), logging.getLogger(f"test.{name}"))


def _calibrated(cfg: dict[str, Any], x: torch.Tensor) -> torch.nn.Module:
    """A random network that behaves like a trained one where explanations care, built in milliseconds.

    * Batch-norm statistics matched to ``x``-like inputs: with its initial running statistics a random
      EfficientNet's logits are ~1e-14 in eval mode (every map constant).
    * Class 1's output weights are minus class 0's, with no bias: the predicted class then has a
      positive logit, i.e. positive evidence. A random head can make every class's Grad-CAM negative
      everywhere (zero after the ReLU: constant), which a trained network does not do for the class
      it predicts (``test_gradcam_highlights_the_evidence`` uses a trained one).
    """
    net = build_classifier(cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average of the batches below
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, *x.shape[1:]))
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight[1] = -head.weight[0]
        head.bias.zero_()
    return net.eval()


# (name, spatial dims, input shape, config options, occlusion options that keep the test fast)
NETWORKS: list[tuple[str, int, tuple[int, ...], dict[str, Any], dict[str, Any]]] = [
    ("resnet18", 2, (1, 1, 16, 16), SMALL, {}),
    ("resnet18", 2, (1, 1, 28, 28), SMALL, {}),
    # DenseNet121 and EfficientNet-B0 downsample 32 times: at 32 px their Grad-CAM layer is 1x1 and the
    # map constant by construction (see test_one_voxel_feature_map_gives_constant_cam), so 64 px here
    ("densenet121", 2, (1, 1, 64, 64), {}, {"mask_size": 16, "overlap": 0.5}),
    ("efficientnet-b0", 2, (1, 1, 64, 64), {}, {"mask_size": 16, "overlap": 0.5}),
    ("resnet18", 3, (1, 1, 16, 16, 16), SMALL, {}),
    ("cnn_rnn", 3, (1, 2, 16, 16, 8), {**SMALL, "encoder": "resnet10"}, {}),
]


@pytest.mark.parametrize(("name", "dims", "shape", "options", "occlusion"), NETWORKS,
                         ids=[f"{n[0]}-{n[1]}d-{n[2][-1]}" for n in NETWORKS])
def test_maps_have_the_input_size_and_are_not_constant(name: str, dims: int, shape: tuple[int, ...],
                                                       options: dict[str, Any], occlusion: dict[str, Any]) -> None:
    torch.manual_seed(1)
    cfg = classifier_config(name, dims, shape[1], 2, **options)
    x = torch.rand(shape)
    net = _calibrated(cfg, x)
    maps = explain(net, cfg, x, METHODS, **occlusion)
    assert list(maps) == list(METHODS)
    for method, m in maps.items():
        assert m.shape == (1, *shape[2:]), method
        assert m.dtype == np.float32 and np.isfinite(m).all(), method
        assert m.min() >= 0.0 and m.max() <= 1.0, method
        assert m.max() - m.min() > 0.5 and m.std() > 1e-3, f"{method} map is (nearly) constant"


def test_one_voxel_feature_map_gives_constant_cam() -> None:
    cfg = classifier_config("densenet121", 2, 1, 2)
    x = torch.rand(1, 1, 32, 32)
    e = Explainer(_calibrated(cfg, x), cfg, ["gradcam"])
    m = e(x)["gradcam"]
    assert e.feature_shape == (1, 1)  # what the explain stage warns about
    assert m.shape == (1, 32, 32) and not m.any()


def test_batches_and_class_choice() -> None:
    torch.manual_seed(0)
    cfg = classifier_config("resnet18", 2, 1, 3, **SMALL)
    x = torch.rand(3, 1, 16, 16)
    net = _calibrated(cfg, x)
    e = Explainer(net, cfg, ["gradcam", "occlusion"])
    both = e(x, [0, 1, 2])
    assert both["gradcam"].shape == (3, 16, 16) and both["occlusion"].shape == (3, 16, 16)
    one = e(x[1:2], 1)
    np.testing.assert_allclose(one["gradcam"][0], both["gradcam"][1], atol=1e-5)
    with torch.no_grad():
        predicted = net(x).argmax(1).tolist()
    np.testing.assert_allclose(e(x)["gradcam"], e(x, predicted)["gradcam"], atol=1e-5)
    with pytest.raises(ValueError, match="2 class indices for a batch of 3"):
        e(x, [0, 1])
    with pytest.raises(ValueError, match="outside the network's 3 classes"):
        e(x, 3)
    with pytest.raises(ValueError, match="unknown explanation method"):
        Explainer(net, cfg, ["saliency"])


def test_own_cam_matches_monai_on_an_ordinary_network() -> None:
    """The hooked per-slice implementation (used for cnn_rnn) computes what MONAI's GradCAM(++) computes."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    cfg = classifier_config("resnet18", 2, 1, 2, **SMALL)
    x = torch.rand(1, 1, 28, 28)
    net = _calibrated(cfg, x)
    monai_maps = Explainer(net, cfg, ["gradcam", "gradcampp"])(x, 1)
    for method in ("gradcam", "gradcampp"):
        raw, _ = hooked_cams(net, "layer4", x, 1, plus=method == "gradcampp")
        up = F.interpolate(raw[:, None], size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(normalize(up.numpy()), monai_maps[method][0], atol=1e-4, err_msg=method)


def test_the_callers_network_is_left_untouched() -> None:
    cfg = classifier_config("efficientnet-b0", 2, 1, 2)
    net = build_classifier(cfg).train()
    pooling = net._avg_pooling
    explain(net, cfg, torch.rand(1, 1, 64, 64), ["gradcam", "gradcampp"])
    assert net.training and net._avg_pooling is pooling
    assert all(p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_cnn_rnn_maps_follow_the_slices() -> None:
    """A slice-sequence model's Grad-CAM is computed per slice. Guards: the same map on every slice (a CAM of
    one slice broadcast along the sequence), and maps scaled per slice instead of over the volume."""
    torch.manual_seed(0)
    cfg = classifier_config("cnn_rnn", 3, 1, 2, encoder="resnet10", **SMALL)
    x = torch.rand(1, 1, 16, 16, 6)
    net = _calibrated(cfg, x)
    maps = explain(net, cfg, x, ["gradcam"])["gradcam"][0]
    assert maps.shape == (16, 16, 6)
    per_slice = maps.reshape(-1, 6).max(axis=0)
    assert (per_slice > 0).sum() >= 2  # scaled over the volume, not per slice: several slices carry evidence
    slices = [maps[..., k] for k in range(6)]
    assert not all(np.allclose(slices[0], s) for s in slices[1:]), "one map repeated on every slice"
    assert per_slice.max() == pytest.approx(1.0) and per_slice.min() < 1.0, "scaled over the volume"


def test_occlusion_settings_bound_the_cost() -> None:
    assert occlusion_settings((28, 28)) == ([8, 8], 0.75, 121)
    assert occlusion_settings((224, 224))[2] == 13 * 13
    assert occlusion_settings((24, 20)) == ([8, 8], 0.75, 9 * 7)  # the step is exactly a quarter of the mask
    assert occlusion_settings((28, 28, 28)) == ([10, 10, 10], 0.5, 125)
    assert max(occlusion_settings((s, s + 3))[2] for s in range(8, 300)) <= 13 * 13
    assert max(occlusion_settings((s, s, s + 1))[2] for s in range(4, 200)) <= 5 ** 3
    assert occlusion_settings((16, 16, 8), mask_size=20)[0] == [16, 16, 8]  # clipped to the image
    with pytest.raises(ValueError, match="overlap"):
        occlusion_settings((16, 16), overlap=1.0)


# -- does Grad-CAM look where the evidence is? ---------------------------------------------------------


def _squares(rng: np.random.Generator, n: int, size: int = 24, side: int = 6
             ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Noise images; class 1 has a bright square at a random place. Returns images, classes, square masks."""
    x = rng.uniform(0.0, 0.3, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        r, c = rng.integers(0, size - side + 1, 2)
        masks[i, r:r + side, c:c + side] = True
        if y[i]:
            x[i, 0][masks[i]] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y), masks


def test_gradcam_highlights_the_evidence() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = classifier_config("resnet18", 2, 1, 2, **SMALL)
    net = build_classifier(cfg)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(40):
        x, y, _ = _squares(rng, 16)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y, masks = _squares(rng, 30)
    pos = np.flatnonzero(y.numpy() == 1)
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() >= 0.8, "the tiny network did not learn the task"
    maps = explain(net, cfg, x[pos], METHODS, 1)
    for method, m in maps.items():
        inside = np.array([m[j][masks[i]].mean() for j, i in enumerate(pos)])
        outside = np.array([m[j][~masks[i]].mean() for j, i in enumerate(pos)])
        assert inside.mean() > 1.5 * outside.mean(), f"{method}: {inside.mean():.3f} vs {outside.mean():.3f}"
        assert (inside > outside).mean() >= 0.7, method


# -- figures ----------------------------------------------------------------------------------------


def test_choose_slices() -> None:
    m = np.zeros((8, 8, 20), np.float32)
    m[2:5, 2:5, 13] = 1.0
    m[2:5, 2:5, 12] = 0.9
    m[:, :, 3] = 0.5
    image = np.zeros((1, 8, 8, 20), np.float32)
    image[0, 1:7, 1:7, 5:15] = 1.0
    strongest = choose_slices({"gradcam": m}, image, 2)
    assert strongest == [3, 13]  # the peak, then the next peak far enough away (12 is too close)
    assert choose_slices({"gradcam": m}, image, 3, "even") == [5, 10, 14]  # linspace(5, 14, 3), rounded
    assert choose_slices({"gradcam": m}, image, 30) == list(range(20))


def test_explanation_png_2d_rgb_and_3d(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps2 = {"gradcam": rng.random((20, 16)), "occlusion": rng.random((20, 16))}
    assert explanation_png(tmp_path / "a.png", rng.random((3, 20, 16)), maps2, "rgb") == []
    maps3 = {m: rng.random((12, 10, 9)) for m in METHODS}
    shown = explanation_png(tmp_path / "b.png", rng.random((2, 12, 10, 9)), maps3, "vol", n_slices=4,
                            attention=np.full(9, 1 / 9), channel=1, spacing=[1.0, 1.0, 2.5])
    assert len(shown) == 4
    for f in ("a.png", "b.png"):
        assert (tmp_path / f).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="shape"):
        explanation_png(tmp_path / "c.png", rng.random((1, 20, 16)), {"gradcam": rng.random((16, 20))}, "x")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


# -- the stage ------------------------------------------------------------------------------------------


def _png(path: Path, a: np.ndarray) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8), mode="L").save(path, format="PNG")
    return str(path)


@pytest.fixture(scope="module")
def png_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain_png")
    rng = np.random.default_rng(0)
    x, y, _ = _squares(rng, 10, size=20, side=5)
    items = [{"image": _png(root / "images" / f"img{i}.png", x[i, 0].numpy()), "class": int(y[i]),
              "patient_id": f"P{i}", "study_uid": f"1.2.{i}"} for i in range(10)]
    doc = {"class_names": {"0": "empty", "1": "square"}, "train": items[:4], "val": items[4:5], "test": items[5:]}
    path = root / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


def _checkpoint(path: Path, cfg: dict[str, Any], input_shape: list[int], spec: list[dict[str, Any]],
                names: dict[int, str], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_classifier(cfg)
    write_classifier_checkpoint(path, net=net, model=cfg, names=names, input_shape=input_shape, eval_transforms=spec,
                     record={"epoch": 0, "fold": 0})
    return path


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "explanations.csv").read_text())))


def test_explain_stage_2d_end_to_end(tmp_path: Path, png_datalist: Path) -> None:
    cfg = classifier_config("resnet18", 2, 1, 2, **SMALL)
    names = {0: "empty", 1: "square"}
    ck = [_checkpoint(tmp_path / f"fold{k}.pt", cfg, [1, 20, 20], classifier_eval_transforms(2, None), names, seed=k)
          for k in range(2)]
    ctx = _ctx(tmp_path, "04_explain", {"classifier": [str(c) for c in ck], "datalist": str(png_datalist)})
    result = explain_stage(ctx, ExplainParams(max_cases=3))
    folder = Path(result.outputs["explanations"])
    rows = _rows(folder)
    assert result.metrics["n_explained"] == len(rows) == 3
    assert 0 <= result.metrics["n_misclassified"] <= 5
    wrong = [int(r["misclassified"]) for r in rows]
    assert wrong == sorted(wrong, reverse=True)  # misclassified cases first
    for r in rows:
        assert (folder / r["file"]).read_bytes()[:8] == PNG_MAGIC
        assert r["file"] == f"{r['case']}_explain.png" and r["true"] in names.values()
        assert 0.0 <= float(r["probability"]) <= 1.0
    assert str(ck[0]) in result.inputs and str(png_datalist) in result.inputs

    ctx2 = _ctx(tmp_path, "05_explain", {"datalist": str(png_datalist)})
    chosen = explain_stage(ctx2, ExplainParams(checkpoints=[str(ck[0])], cases=["P7", "1.2.5"], target="true",
                                               methods=["gradcam", "gradcam"], max_cases=1))
    rows = _rows(ctx2.stage_dir)
    assert [r["patient_id"] for r in rows] == ["P7", "P5"]  # the given order; max_cases ignored for lists
    assert all(r["target"] == r["true"] for r in rows) and chosen.metrics["n_explained"] == 2

    with pytest.raises(StageError, match="P99 not in the test split"):
        explain_stage(_ctx(tmp_path, "06_explain", {"datalist": str(png_datalist)}),
                      ExplainParams(checkpoints=[str(ck[0])], cases=["P99"]))
    with pytest.raises(StageError, match="no earlier stage gives .classifier."):
        explain_stage(_ctx(tmp_path, "07_explain", {"datalist": str(png_datalist)}), ExplainParams())


def test_explain_params_are_checked() -> None:
    bad: dict[str, Any]
    for bad in ({"methods": ["saliency"]}, {"methods": []}, {"cases": "wrong_ones"}, {"max_cases": 0},
                {"overlap": 1.0}, {"mask_sise": 4}):  # the last: a typo is an error
        with pytest.raises(ValidationError):
            ExplainParams.model_validate(bad)
    p = ExplainParams.model_validate({"methods": ["occlusion", "gradcam", "occlusion"], "cases": ["P1"]})
    assert p.methods == ["occlusion", "gradcam"] and p.cases == ["P1"]


def test_explain_stage_cnn_rnn_montage(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shape = (16, 16, 8)
    items = []
    for i in range(3):
        files = []
        for ch in ("FLAIR", "T1"):
            vol = np.zeros(shape, np.float32)
            vol[3:13, 3:13, 1:7] = rng.uniform(50, 100, (10, 10, 6))
            path = tmp_path / "vol" / f"C{i}_{ch}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
            files.append(str(path))
        items.append({"image": files, "class": i % 2, "patient_id": f"C{i}", "study_uid": f"9.{i}"})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"train": [], "val": [], "test": items}))
    cfg = classifier_config("cnn_rnn", 3, 2, 2, encoder="resnet10", **SMALL)
    ck = _checkpoint(tmp_path / "cnn_rnn.pt", cfg, [2, *shape], classifier_eval_transforms(3, None),
                     {0: "normal", 1: "abnormal"})
    ctx = _ctx(tmp_path, "03_explain", {"classifier": [str(ck)], "datalist": str(dl)})
    result = explain_stage(ctx, ExplainParams(cases="all", slices=3, slice_choice="even", channel=1))
    rows = _rows(ctx.stage_dir)
    assert result.metrics["n_explained"] == 3 and [r["patient_id"] for r in rows] == ["C0", "C1", "C2"]
    for r in rows:
        assert (ctx.stage_dir / r["file"]).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(StageError, match="channel 5 does not exist"):
        explain_stage(_ctx(tmp_path, "04_explain", {"classifier": [str(ck)], "datalist": str(dl)}),
                      ExplainParams(cases="all", channel=5, methods=["gradcam"]))
