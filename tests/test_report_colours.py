"""Figures are colour-blind safe: Okabe-Ito outlines and lines, no red next to green, no jet rainbow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medpipe.report import colours
from medpipe.report.classification_plots import calibration_png, roc_png
from medpipe.report.explanation_plots import explanation_png
from medpipe.report.segmentation_plots import overlay_png
from medpipe.report.training_plots import curve_png

#: matplotlib's default red and green (tab:red, tab:green) and the pure ones the overlays used to use
RED_GREEN = [(214, 39, 40), (44, 160, 44), (255, 0, 0), (0, 255, 0)]


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _on_white(rgb: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    r, g, b = (round(alpha * c + (1 - alpha) * 255) for c in rgb)
    return r, g, b


def _pixels_near(path: Path, rgb: tuple[int, int, int], tol: int = 12) -> int:
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=-1) <= tol).sum())


def _greenish(path: Path) -> int:
    """Pixels a viewer would call green (jet's middle): strong green, weak red and blue."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((a[..., 1] > 160) & (a[..., 0] < 140) & (a[..., 2] < 140)).sum())


def test_segmentation_overlay_outlines_truth_and_prediction_in_okabe_ito(tmp_path: Path) -> None:
    yy, xx, zz = np.indices((48, 48, 12))
    image = 100.0 * ((xx - 24) ** 2 + (yy - 24) ** 2 < 20 ** 2)
    truth = (xx - 22) ** 2 + (yy - 22) ** 2 + (zz - 6) ** 2 < 49
    pred = (xx - 26) ** 2 + (yy - 24) ** 2 + (zz - 6) ** 2 < 36
    image[truth] = 250.0
    out = tmp_path / "overlay.png"
    assert overlay_png(image, truth, pred, np.diag([3.0, 3.0, 4.0, 1.0]), out, "case") in (5, 6, 7)
    assert _pixels_near(out, _rgb(colours.TRUTH)) > 30
    assert _pixels_near(out, _rgb(colours.PREDICTION)) > 30
    for rgb in RED_GREEN:
        assert _pixels_near(out, rgb, tol=30) == 0, rgb


def test_training_curve_and_roc_use_no_red_green_pair(tmp_path: Path) -> None:
    history = [{"epoch": e, "d_loss": 1.0 / e, "g_loss": 0.5 + 0.1 * e, "fid": 50.0 / e} for e in range(1, 6)]
    curve_png(history, tmp_path / "curve.png", "gan", metric="fid", metric_label="FID", metric_range=None,
              losses={"d_loss": "D loss", "g_loss": "G loss"})
    assert _pixels_near(tmp_path / "curve.png", _on_white(_rgb(colours.BLUE), 0.8)) > 20  # the lines' alpha
    assert _pixels_near(tmp_path / "curve.png", _on_white(_rgb(colours.REDDISH_PURPLE), 0.8)) > 20

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25)
    prob = rng.dirichlet(np.ones(4), size=100)
    prob[np.arange(100), y] += 0.5
    prob /= prob.sum(1, keepdims=True)
    roc_png(y, prob, tmp_path / "roc.png", class_names={0: "a", 1: "b", 2: "c", 3: "d"})
    binary = np.stack([prob[:, 0], 1 - prob[:, 0]], 1)
    calibration_png((y != 0).astype(int), binary, tmp_path / "calibration.png")
    for name in ("curve.png", "roc.png", "calibration.png"):
        for rgb in RED_GREEN:
            assert _pixels_near(tmp_path / name, rgb, tol=25) == 0, (name, rgb)


def test_explanation_heat_maps_are_not_a_red_green_rainbow(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.indices((24, 20))
    heat = np.exp(-((yy - 12) ** 2 + (xx - 10) ** 2) / 30.0)
    explanation_png(tmp_path / "e.png", rng.random((1, 24, 20)), {"gradcam": heat, "occlusion": heat[::-1]}, "case")
    assert _greenish(tmp_path / "e.png") == 0
