"""Library pieces the trainers use: validation Dice, FID and class rate, the training curve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medpipe.metrics.generative import class_rate, features_and_classes, fid, matched_fid
from medpipe.metrics.segmentation import foreground_dice, validation_dice
from medpipe.report.training_plots import curve_png, samples_png


def _prob(mask: torch.Tensor, classes: int = 2) -> torch.Tensor:
    """One-hot 'probabilities' (1, classes, ...) of a class-index mask (...)."""
    return torch.nn.functional.one_hot(mask.long(), classes).movedim(-1, 0)[None].float()


def test_validation_dice_averages_cases_with_foreground_only() -> None:
    truth = torch.zeros(1, 1, 8, 8, 4)
    truth[..., 2:6, 2:6, 1:3] = 1
    half = truth.clone()
    half[..., 2:4, 2:6, 1:3] = 0  # half the tumour: Dice 2/3
    assert foreground_dice(_prob(truth[0, 0]), truth, 2) == [1.0]
    empty = torch.zeros_like(truth)
    # the tumour-free case (a false positive) is not averaged in
    score = validation_dice([(_prob(truth[0, 0]), truth), (_prob(half[0, 0]), truth), (_prob(truth[0, 0]), empty)], 2)
    assert score == pytest.approx((1.0 + 2 / 3) / 2)
    # no case with foreground: the fraction predicted empty
    assert validation_dice([(_prob(empty[0, 0]), empty), (_prob(truth[0, 0]), empty)], 2) == 0.5
    assert math.isnan(validation_dice([], 2))


def test_fid_is_zero_for_one_set_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    b = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    near, far = fid(a, b), fid(a, b + 2.0)
    assert near is not None and far is not None and near < 0.5 < 4 * 4 - 1 < far  # |shift|^2 = 16
    assert fid(a, b[:1]) is None
    assert matched_fid(a, b, 50, seed=0) == matched_fid(a, b, 50, seed=0)
    assert matched_fid(a, b, 500, seed=0) is None


def test_features_and_class_rate() -> None:
    net = torch.nn.Sequential()
    net.add_module("body", torch.nn.Flatten())
    net.add_module("fc", torch.nn.Linear(4, 2))
    x = torch.randn(10, 1, 2, 2)
    feats, pred = features_and_classes(net, x, "cpu", batch=3)
    assert feats.shape == (10, 4) and feats.dtype == torch.float64 and torch.equal(feats.float(), x.flatten(1))
    assert class_rate(torch.tensor([0, 1, 1, 1]), 1) == 0.75 and class_rate(torch.tensor([]), 0) is None
    assert pred.shape == (10,)


def test_curve_and_sample_pngs(tmp_path: Path) -> None:
    rows = [{"fold": f, "epoch": e, "loss": 1.0 / e, "val_auc": 0.5 + 0.1 * e if e % 2 == 0 else None}
            for f in (0, 1) for e in (1, 2, 3, 4)]
    curve_png(rows, tmp_path / "a.png", "t", metric="val_auc", metric_label="AUC", group="fold")
    gan = [{"epoch": 0, "d_loss": None, "g_loss": None, "fid": 40.0}, {"epoch": 1, "d_loss": 1.9, "g_loss": 0.1,
                                                                        "fid": 20.0}]
    curve_png(gan, tmp_path / "b.png", "t", metric="fid", metric_label="FID", metric_range=None,
              losses={"d_loss": "D", "g_loss": "G"})
    samples_png(tmp_path / "c.png", [("real", torch.zeros(3, 1, 8, 8).numpy()), ("fake", torch.ones(2, 3, 8, 8).numpy())],
                "t")
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
