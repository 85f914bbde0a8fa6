"""Stage ``augment``: add ``n`` GAN-made images of one class to a datalist's ``train`` split.

Reads a ``train_gan`` generator (``generator.pt``), draws ``n`` images of its target class (or of
``target_class``) from latent vectors seeded by the run's seed, writes them as 8-bit PNGs under
``<stage dir>/synthetic/`` and a new ``datalist.json`` in the stage folder: the input datalist with
the synthetic items appended to ``train``; ``val`` and ``test`` are copied untouched (synthetic images
must never be evaluated on). Each new item is ``{"image", "class", "synthetic": true, "patient_id":
"synthetic-00000", "study_uid": same, "generator": path}``. Outputs ``{"datalist": new path}``, so
a ``train_classifier`` stage after this one trains on the augmented split.

**Array convention.** The real PNGs are read by MONAI's ``LoadImaged`` (PIL reader), which returns
them transposed: a PNG of ``H`` rows and ``W`` columns loads as an array of shape ``(W, H)``. The GAN
learnt images in that loaded convention, so a generated array ``a`` (channel first, ``(C, W, H)``)
is written as ``a.T`` (``(H, W)`` grey or ``(H, W, C)`` colour) and ``LoadImaged`` reads back exactly
``a`` (as 8-bit values: the generator's ``[-1, 1]`` mapped to ``0..255``), oriented like the real
images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from medpipe.data.datalist import datalist_json, load_datalist
from medpipe.data.images import to_uint8, write_png
from medpipe.errors import StageError
from medpipe.inference.checkpoint import load_generator
from medpipe.io import sha256_file, write_text_atomic
from medpipe.stage import InputPath, Need, RunContext, StageParams, StageResult, stage


class AugmentParams(StageParams):
    generator: InputPath | None = Field(default=None, description="generator.pt of train_gan; None: the artifact 'generator'")
    datalist: InputPath | None = Field(default=None, description="datalist.json to augment; None: the artifact 'datalist'")
    n: int = Field(ge=1, description="number of synthetic images to add to the train split")
    target_class: int | None = Field(default=None, ge=0, description="class to generate; None: the generator's "
                                                                      "target class")
    batch_size: int = Field(default=256, ge=1, description="images generated per forward pass")


@stage("augment", AugmentParams,
       needs=(Need("generator", params=("generator",)), Need("datalist", params=("datalist",))),
       gives=("datalist",))
def augment(ctx: RunContext, p: AugmentParams) -> StageResult:
    import torch

    gen_path = ctx.input("generator", p.generator)
    dl_path = ctx.input("datalist", p.datalist)
    doc = load_datalist(dl_path)
    for split in ("val", "test"):
        bad = [it for it in doc.get(split, []) if it.get("synthetic")]
        if bad:
            raise StageError(f"{dl_path}: {len(bad)} synthetic item(s) in the {split} split (e.g. "
                             f"{bad[0].get('image')}); synthetic data may only be used for training")
    net, gdoc = load_generator(gen_path, ctx.device)
    classes = [int(c) for c in gdoc["classes"]]
    target = int(p.target_class if p.target_class is not None else gdoc["target_class"])
    if target not in classes:
        raise StageError(f"target_class: the generator makes classes {classes}, not {target}")
    names = {int(k): v for k, v in (doc.get("class_names") or {}).items()}
    gnames = {int(k): v for k, v in (gdoc.get("class_names") or {}).items()}
    if names and gnames.get(target) is not None and names.get(target) != gnames[target]:
        raise StageError(f"class {target} is {gnames[target]!r} for the generator but {names.get(target)!r} in "
                         f"{dl_path}; use the datalist the GAN was trained on")
    train = list(doc.get("train", []))
    first = next((it for it in train if not it.get("synthetic")), None)
    if first is not None:
        _check_shape(first, gdoc, ctx)

    out_dir = ctx.stage_dir / "synthetic"
    start = sum(1 for it in train if it.get("synthetic"))  # earlier augment stages: keep names unique
    rng = torch.Generator().manual_seed(ctx.seed)
    new: list[dict[str, Any]] = []
    with ctx.progress("Generating images", p.n) as advance:
        for b0 in range(0, p.n, p.batch_size):
            k = min(p.batch_size, p.n - b0)
            images = to_uint8(net.sample(torch.full((k,), classes.index(target), dtype=torch.long), rng).cpu().numpy())
            for i in range(k):
                case = f"synthetic-{start + b0 + i:05d}"
                path = out_dir / f"{case}.png"
                write_png(images[i], path)
                new.append({"image": str(path), "class": target, "synthetic": True, "patient_id": case,
                            "study_uid": case, "generator": str(gen_path)})
            advance(k)
    out_doc = {**doc, "train": train + new,
               "augmentation": [*doc.get("augmentation", []),
                                {"generator": str(gen_path), "class": target, "n": p.n, "seed": ctx.seed,
                                 "source_datalist": str(dl_path)}]}
    out = ctx.stage_dir / "datalist.json"
    write_text_atomic(out, datalist_json(out_doc, out, relative_within=ctx.run_dir))
    counts = np.bincount([int(it["class"]) for it in out_doc["train"] if it.get("class") is not None]).tolist()
    ctx.log.info("added %d synthetic images of class %d (%s) to the train split (now %s per class) -> %s", p.n,
                 target, names.get(target, f"class {target}"), counts, out)
    return StageResult(outputs={"datalist": str(out)},
                       metrics={"n_synthetic": p.n, "synthetic_class": target,
                                "n_train_augmented": len(out_doc["train"])},
                       inputs={str(dl_path): sha256_file(dl_path), str(gen_path): sha256_file(gen_path)})


def _check_shape(item: dict[str, Any], gdoc: dict[str, Any], ctx: RunContext) -> None:
    """Refuse a generator whose channel count differs from the datalist's images; warn on another size."""
    from medpipe.data.transforms import build_transforms

    image = item["image"]
    if isinstance(image, list):
        channels = len(image)
        image = image[0]
    else:
        channels = 0
    try:
        loaded = build_transforms([{"LoadImaged": {"keys": ["image"]}}, {"EnsureChannelFirstd": {"keys": ["image"]}}])(
            {"image": image})["image"]
    except Exception as exc:  # any unreadable file: say which one
        raise StageError(f"cannot read {image} ({type(exc).__name__}: {exc})") from exc
    channels = channels or int(loaded.shape[0])
    if channels != int(gdoc["in_channels"]):
        raise StageError(f"the generator makes {gdoc['in_channels']}-channel images, the datalist's have {channels}")
    size = [int(s) for s in loaded.shape[1:]]
    if size != [int(s) for s in gdoc["image_size"]]:
        ctx.log.warning("the generator makes %s images, the datalist's are %s: give the classifier a Resized "
                        "transform so both end up one size", gdoc["image_size"], size)
