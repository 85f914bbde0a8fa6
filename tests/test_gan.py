"""GAN augmenter: networks, the train_gan stage, the augment stage and the synthetic-data guard rails."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from medpipe.data.datalist import class_items, load_datalist
from medpipe.data.images import to_uint8, write_png
from medpipe.errors import StageError
from medpipe.models.gan import build_discriminator, build_generator, diff_augment
from medpipe.models.gan_config import GAN_FORMAT, gan_config
from medpipe.runner import seed_everything
from medpipe.stage import RunContext
from medpipe.stages.augment import AugmentParams, augment
from medpipe.stages.train_gan import TrainGanParams, train_gan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16
#: a GAN small and short enough for a test (seconds on one CPU thread)
TINY = {"epochs": 2, "batch_size": 8, "latent_dim": 8, "g_channels": 4, "d_channels": 4, "n_eval": 16,
        "fid_every": 1, "extractor_epochs": 1, "extractor_width": 0.125, "grid": 3}


def _ctx(tmp_path: Path, name: str, artifacts: dict[str, Any], seed: int = 0) -> RunContext:
    stage_dir = tmp_path / "stages" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, False)
    return RunContext(tmp_path, stage_dir, seed, "cpu", False, False, dict(artifacts),
                      logging.getLogger(f"test.{name}"))


def _png(path: Path, cls: int, rng: np.random.Generator) -> str:
    """Class 0: a bright disc on a dark background; class 1: a dark disc on a bright one (plus noise)."""
    yy, xx = np.indices((SIZE, SIZE))
    c = rng.uniform(5, 11, 2)
    disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 16
    image = np.where(disc, 200, 50) if cls == 0 else np.where(disc, 50, 200)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(path)
    return str(path)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 PNGs of 16x16: 16 train (6 of class 0), 4 val, 4 test."""
    root = tmp_path_factory.mktemp("gan_data")
    rng = np.random.default_rng(0)
    doc: dict[str, Any] = {"class_names": {"0": "bright", "1": "dark"}, "train": [], "val": [], "test": []}
    for i in range(24):
        split = "train" if i < 16 else "val" if i < 20 else "test"
        cls = int(i >= 6) if split == "train" else i % 2  # train: 6 of class 0, 10 of class 1
        case = f"case-{i:02d}"
        doc[split].append({"image": _png(root / "images" / f"{case}.png", cls, rng), "class": cls,
                           "patient_id": case, "study_uid": case})
    path = root / "datalist.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


@pytest.fixture(scope="module")
def trained(datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny train_gan run of a GAN conditional on both classes: (its stage folder, its StageResult)."""
    import torch as _torch

    before = _torch.get_num_threads()
    _torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("gan_run")
        ctx = _ctx(run, "01_train_gan", {"datalist": str(datalist)})
        result = train_gan(ctx, TrainGanParams(target_class=0, condition_on="all", **TINY))  # type: ignore[arg-type]
    finally:
        _torch.set_num_threads(before)
    return ctx.stage_dir, result


# -- networks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("d_norm", "g_upsample"), [("spectral", "resize"), ("batch", "transposed")])
def test_generator_and_discriminator_shapes(size: int, channels: int, d_norm: str, g_upsample: str) -> None:
    cfg = gan_config(size, channels, 2, latent_dim=8, g_channels=4, d_channels=4, d_norm=d_norm, g_upsample=g_upsample)
    assert json.loads(json.dumps(cfg)) == cfg  # JSON-able: stored in the checkpoint
    g, d = build_generator(cfg, seed=0), build_discriminator(cfg, seed=0)
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():
        x = g(torch.randn(3, 8), y)
    assert x.shape == (3, channels, size, size)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # tanh
    assert d(x, y).shape == (3,)
    assert diff_augment(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_gan_config_rejects_bad_sizes_and_builders_are_seeded() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        gan_config(30, 1, 2)
    with pytest.raises(ValueError, match="d_norm"):
        gan_config(28, 1, 2, d_norm="layer")
    with pytest.raises(ValueError, match="g_upsample"):
        gan_config(28, 1, 2, g_upsample="bilinear")
    cfg = gan_config(28, 1, 2, latent_dim=8, g_channels=4, d_channels=4)
    state = torch.random.get_rng_state()
    a, b = build_generator(cfg, seed=3), build_generator(cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_conditional_generator_makes_different_images_per_class() -> None:
    cfg = gan_config(28, 1, 3, latent_dim=8, g_channels=4, d_channels=4)
    g = build_generator(cfg, seed=0).eval()
    z = torch.randn(1, 8).repeat(3, 1)
    with torch.no_grad():
        x = g(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[1], x[2])
    with torch.no_grad():
        assert torch.allclose(g(z[:1], torch.tensor([1])), x[1:2], atol=1e-6)  # eval mode: per-sample


# -- train_gan -----------------------------------------------------------------------------------------


def test_train_gan_end_to_end(trained: tuple[Path, Any]) -> None:
    stage_dir, result = trained
    for name in ("generator.pt", "samples.png", "history.csv", "curve.png"):
        assert (stage_dir / name).is_file(), name
    assert result.outputs["generator"] == str(stage_dir / "generator.pt")
    assert set(result.outputs) == {"generator", "datalist"}  # the datalist it trained on, for later stages
    m = result.metrics
    for key in ("gan_fid", "gan_fid_real_reference", "gan_target_class_rate", "gan_seconds"):
        assert key in m, key
    # Guards: FID computed real-vs-real (it would be 0): a 2-epoch GAN's images are not the real ones (0.63 here)
    assert m["gan_fid"] is not None and m["gan_fid"] > 0.1 and m["gan_fid"] != m["gan_fid_real_reference"]
    assert 0.0 <= m["gan_target_class_rate"] <= 1.0 and m["gan_target_class"] == 0
    json.dumps(m)  # goes into metrics.json
    doc = torch.load(stage_dir / "generator.pt", weights_only=True)
    assert doc["format"] == GAN_FORMAT and doc["target_class"] == 0 and doc["image_size"] == [SIZE, SIZE]
    assert doc["classes"] == [0, 1] and doc["class_names"] == {"0": "bright", "1": "dark"} and doc["seed"] == 0
    g = build_generator(doc["model"])  # the checkpoint alone rebuilds the generator
    g.load_state_dict(doc["state_dict"])
    rows = (stage_dir / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,d_loss,g_loss") and len(rows) == 1 + 1 + TINY["epochs"]  # + epoch 0


def test_train_gan_defaults_to_the_smallest_class_and_forbids_typos(datalist: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra"):
        TrainGanParams(epoch=3)  # type: ignore[call-arg]
    ctx = _ctx(tmp_path, "01_train_gan", {"datalist": str(datalist)})
    result = train_gan(ctx, TrainGanParams(**{**TINY, "fid_every": 0}))  # type: ignore[arg-type]
    assert result.metrics["gan_target_class"] == 0  # 6 of 16 train images
    assert torch.load(ctx.stage_dir / "generator.pt", weights_only=True)["classes"] == [0]


def test_train_gan_refuses_synthetic_training_items_and_unknown_classes(datalist: Path, tmp_path: Path) -> None:
    doc = json.loads(datalist.read_text())
    doc["train"][0]["synthetic"] = True
    bad = tmp_path / "synthetic_train.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(StageError, match="synthetic"):
        train_gan(_ctx(tmp_path, "a", {"datalist": str(bad)}), TrainGanParams(**TINY))  # type: ignore[arg-type]
    with pytest.raises(StageError, match="no image of class 5"):
        train_gan(_ctx(tmp_path, "b", {"datalist": str(datalist)}),
                  TrainGanParams(target_class=5, **TINY))  # type: ignore[arg-type]


# -- augment --------------------------------------------------------------------------------------------


def test_augment_adds_synthetic_train_items_only(trained: tuple[Path, Any], datalist: Path, tmp_path: Path) -> None:
    from medpipe.data.transforms import build_transforms

    stage_dir, _ = trained
    gen = str(stage_dir / "generator.pt")
    ctx = _ctx(tmp_path, "02_augment", {"datalist": str(datalist), "generator": gen})
    result = augment(ctx, AugmentParams(n=5))
    out = Path(result.outputs["datalist"])
    assert out == ctx.stage_dir / "datalist.json"
    before, after = load_datalist(datalist), load_datalist(out)
    assert after["train"][:len(before["train"])] == before["train"]
    new = after["train"][len(before["train"]):]
    assert len(new) == 5 and all(it["synthetic"] is True and it["class"] == 0 for it in new)
    assert [it["patient_id"] for it in new] == [f"synthetic-{i:05d}" for i in range(5)]
    assert all(it["study_uid"] == it["patient_id"] and it["generator"] == gen for it in new)
    for split in ("val", "test"):  # untouched, byte for byte
        assert json.dumps(after[split]).encode() == json.dumps(before[split]).encode()
    assert not any(it.get("synthetic") for s in ("val", "test") for it in after[s])
    assert class_items(after, "train", path=out)  # the classifier stages accept it
    # the PNGs load like the real images: same shape and orientation convention, 8-bit values
    load = build_transforms([{"LoadImaged": {"keys": ["image"]}}, {"EnsureChannelFirstd": {"keys": ["image"]}}])
    real = load({"image": before["train"][0]["image"]})["image"]
    synth = load({"image": new[0]["image"]})["image"]
    assert synth.shape == real.shape == (1, SIZE, SIZE)
    # deterministic from the run seed: the same seed gives the same files
    again = augment(_ctx(tmp_path / "again", "02_augment", {"datalist": str(datalist), "generator": gen}),
                    AugmentParams(n=5))
    again_items = load_datalist(Path(again.outputs["datalist"]))["train"][-5:]
    assert [Path(a["image"]).read_bytes() for a in again_items] == [Path(b["image"]).read_bytes() for b in new]


def test_augment_images_reload_equal_to_the_generated_arrays(trained: tuple[Path, Any], tmp_path: Path) -> None:
    """What the generator made (in the loader's array convention) is exactly what LoadImaged reads back."""
    from medpipe.data.transforms import build_transforms
    from medpipe.inference.checkpoint import load_generator

    net, _ = load_generator(trained[0] / "generator.pt", "cpu")
    arrays = to_uint8(net.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0)).numpy())
    load = build_transforms([{"LoadImaged": {"keys": ["image"]}}, {"EnsureChannelFirstd": {"keys": ["image"]}}])
    for i, a in enumerate(arrays):
        write_png(a, tmp_path / f"g{i}.png")
        back = np.asarray(load({"image": str(tmp_path / f"g{i}.png")})["image"])
        assert back.shape == a.shape and np.array_equal(back, a)


@pytest.mark.parametrize("channels", [1, 3])
def test_write_png_round_trips_non_square_arrays(tmp_path: Path, channels: int) -> None:
    from medpipe.data.transforms import build_transforms

    a = np.random.default_rng(0).integers(0, 256, (channels, 12, 20), dtype=np.uint8)  # (C, W, H)
    write_png(a, tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").size == (12, 20)  # PIL: (width, height)
    load = build_transforms([{"LoadImaged": {"keys": ["image"]}}, {"EnsureChannelFirstd": {"keys": ["image"]}}])
    back = np.asarray(load({"image": str(tmp_path / "x.png")})["image"])
    assert np.array_equal(back, a)
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left


def test_augment_refuses_bad_inputs(trained: tuple[Path, Any], datalist: Path, tmp_path: Path) -> None:
    gen = str(trained[0] / "generator.pt")
    with pytest.raises(ValidationError):
        AugmentParams(n=0)
    with pytest.raises(ValidationError):
        AugmentParams()  # type: ignore[call-arg]
    doc = json.loads(datalist.read_text())
    doc["test"][0]["synthetic"] = True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(StageError, match="synthetic"):
        augment(_ctx(tmp_path, "a", {"datalist": str(bad), "generator": gen}), AugmentParams(n=1))
    with pytest.raises(StageError, match="makes classes"):
        augment(_ctx(tmp_path, "b", {"datalist": str(datalist), "generator": gen}), AugmentParams(n=1, target_class=4))
    with pytest.raises(StageError, match="no earlier stage gives .generator."):
        augment(_ctx(tmp_path, "c", {"datalist": str(datalist)}), AugmentParams(n=1))
    not_a_gan = tmp_path / "x.pt"
    torch.save({"format": "something else"}, not_a_gan)
    with pytest.raises(StageError, match="not a medpipe GAN"):
        augment(_ctx(tmp_path, "d", {"datalist": str(datalist)}), AugmentParams(n=1, generator=str(not_a_gan)))


@pytest.mark.parametrize("split", ["val", "test"])
def test_class_items_refuses_synthetic_items_outside_train(datalist: Path, split: str) -> None:
    doc = json.loads(datalist.read_text())
    doc[split][1]["synthetic"] = True
    with pytest.raises(StageError, match=f"synthetic item.*{split} split"):
        class_items(doc, split, path=datalist)
    doc["train"][0]["synthetic"] = True
    assert len(class_items(doc, "train", path=datalist)) == len(doc["train"])
