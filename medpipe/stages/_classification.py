"""What the classifier stages share: class items, default transforms, checkpoints, ensemble inference.

Not a stage. ``train_classifier``, ``evaluate_classifier``, ``explain``, ``train_gan`` and ``augment``
import it.

**Items.** A classification datalist item has ``image`` (a file, or a list of files = channels) and
``class`` (an integer); ``class_names`` at the datalist's top level names the classes. Items that a
GAN made carry ``"synthetic": true``; they may only ever be in the ``train`` split
(:func:`class_items` refuses them anywhere else).

**Checkpoints** (``torch.load(weights_only=True)``-readable dictionaries): the weights, the network
configuration (:func:`medpipe.models.classification.classifier_config`), the class names, the input
shape, the eval transforms and the training record, so the evaluation, explanation and scoring
stages need nothing else. A k-fold run writes one checkpoint per fold: the ensemble.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import StageError
from medpipe.stages._common import read_checkpoint, save_checkpoint

CHECKPOINT_FORMAT = "medpipe-classifier"
CHECKPOINT_VERSION = 1

KEYS = ["image"]


# -- items ----------------------------------------------------------------------------------------------


def class_items(doc: dict[str, Any], split: str, *, path: Path) -> list[dict[str, Any]]:
    """The items of ``split`` that have a class; synthetic items outside ``train`` are an error."""
    items = doc.get(split, [])
    if split != "train":
        synthetic = [it for it in items if it.get("synthetic")]
        if synthetic:
            raise StageError(f"{path}: {len(synthetic)} synthetic item(s) in the {split} split (e.g. "
                             f"{synthetic[0].get('image')}); synthetic data may only be used for training")
    out = [it for it in items if it.get("class") is not None]
    if not out:
        raise StageError(f"the {split} split of {path} has no items with a class; check the dataset stage's "
                         "labels and split")
    return out


def model_inputs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"image", "class"}`` of each item: what the networks see.

    Items of one split can carry different extra keys (real items their source index, synthetic ones
    ``synthetic`` and ``generator``), and MONAI's collate builds a batch from the first item's keys.
    """
    return [{"image": it["image"], "class": int(it["class"])} for it in items]


def class_names(doc: dict[str, Any], items: list[dict[str, Any]]) -> dict[int, str]:
    """Class index -> name: the datalist's ``class_names``, else ``class k`` up to the largest class seen."""
    names = {int(k): str(v) for k, v in (doc.get("class_names") or {}).items()}
    top = max([int(it["class"]) for it in items] + list(names) + [1])
    return {c: names.get(c, f"class {c}") for c in range(top + 1)}


def class_counts(items: list[dict[str, Any]], n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray([int(it["class"]) for it in items], dtype=np.int64), minlength=n_classes)


# -- default transforms ---------------------------------------------------------------------------------


def default_eval_transforms(spatial_dims: int, spatial_size: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """2D: load, channel first, intensities to [0, 1]. 3D: also RAS orientation, per-channel z-score
    over the body (non-zero voxels), a crop to the body. Both: resized to ``spatial_size`` when given."""
    out: list[dict[str, Any]] = [{"LoadImaged": {"keys": KEYS}}, {"EnsureChannelFirstd": {"keys": KEYS}}]
    if spatial_dims == 2:
        out.append({"ScaleIntensityd": {"keys": KEYS, "minv": 0.0, "maxv": 1.0}})
    else:
        out += [{"Orientationd": {"keys": KEYS, "axcodes": "RAS"}},
                {"NormalizeIntensityd": {"keys": KEYS, "nonzero": True, "channel_wise": True}},
                {"CropForegroundd": {"keys": KEYS, "source_key": "image", "margin": 2, "allow_smaller": True}}]
    if spatial_size is not None:
        out.append({"Resized": {"keys": KEYS, "spatial_size": list(spatial_size),
                                "mode": "bilinear" if spatial_dims == 2 else "trilinear"}})
    return out


def default_train_transforms(spatial_dims: int, spatial_size: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """The eval transforms, then left-right flips, a small random affine and intensity jitter."""
    affine: dict[str, Any] = {"keys": KEYS, "prob": 0.5, "padding_mode": "zeros",
                              "mode": "bilinear"}
    if spatial_dims == 2:
        affine.update(rotate_range=0.26, scale_range=0.1, translate_range=2)
    else:
        affine.update(rotate_range=[0.0, 0.0, 0.17], scale_range=0.1, translate_range=2)
    return [
        *default_eval_transforms(spatial_dims, spatial_size),
        {"RandFlipd": {"keys": KEYS, "prob": 0.5, "spatial_axis": 0}},
        {"RandAffined": affine},
        {"RandScaleIntensityd": {"keys": KEYS, "factors": 0.1, "prob": 0.5}},
        {"RandShiftIntensityd": {"keys": KEYS, "offsets": 0.05, "prob": 0.5}},
    ]


def spatial_dims_of(items: list[dict[str, Any]]) -> int:
    """2 for PNG / JPEG / 2D NIfTI images, else 3 (from the first item's file name or header)."""
    image = items[0]["image"]
    first = str(image[0] if isinstance(image, list) else image)
    if first.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        return 2
    try:
        import nibabel as nib

        shape = nib.load(first).shape  # type: ignore[attr-defined]
    except Exception as exc:  # any unreadable file: say which one
        raise StageError(f"cannot read {first} to tell 2D from 3D ({type(exc).__name__}: {exc}); "
                         "set spatial_dims") from exc
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3


# -- imbalance ----------------------------------------------------------------------------------------


def inverse_frequency_weights(counts: np.ndarray) -> np.ndarray:
    """``n / (n_classes * count_c)`` per class (1 for balanced data; 0 for classes absent from training)."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def sample_weights(classes: list[int], counts: np.ndarray) -> np.ndarray:
    """Per-item sampling weight ``1 / count(class)``: every class is drawn equally often in expectation."""
    return np.asarray([1.0 / counts[c] for c in classes], dtype=np.float64)


# -- checkpoints ----------------------------------------------------------------------------------------


def write_checkpoint(path: Path, *, net: Any, model: dict[str, Any], names: dict[int, str], input_shape: list[int],
                     eval_transforms: list[dict[str, Any]], record: dict[str, Any]) -> None:
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "model": model, "class_names": {str(k): v for k, v in names.items()}, "input_shape": input_shape,
        "eval_transforms": eval_transforms, **record,
    })


def load_classifier(path: Path | str, device: str) -> tuple[Any, dict[str, Any]]:
    """``(network in eval mode on device, checkpoint document)``; loads tensors only (``weights_only``)."""
    from medpipe.models.classification import build_classifier

    doc = read_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "medpipe classifier checkpoint")
    net = build_classifier(doc["model"])
    net.load_state_dict(doc["state_dict"])
    net.to(device).eval()
    return net, doc


def load_ensemble(paths: list[str] | list[Path], device: str) -> tuple[list[Any], dict[str, Any]]:
    """The networks of one or more checkpoints (one per fold) and the first one's document.

    Raises:
        StageError: the members disagree on classes, input shape or eval transforms.
    """
    if not paths:
        raise StageError("no classifier checkpoint given")
    nets, docs = [], []
    for p in paths:
        net, doc = load_classifier(p, device)
        nets.append(net)
        docs.append(doc)
    for member, d in zip(paths[1:], docs[1:], strict=True):
        for key in ("class_names", "input_shape", "eval_transforms"):
            if d.get(key) != docs[0].get(key):
                raise StageError(f"ensemble member {member} differs from {paths[0]} in {key}; train them in one stage")
    return nets, docs[0]


# -- inference ----------------------------------------------------------------------------------------


def flip_views(x: Any, tta_axes: list[int] | None) -> list[Any]:
    """``x`` and its flips along each of ``tta_axes`` (spatial axes, 0-based; None: no TTA)."""
    views = [x]
    for a in tta_axes or []:
        views.append(x.flip(2 + a))
    return views


def predict_proba(nets: list[Any], dataset: Any, *, device: str, amp: bool = False, tta_axes: list[int] | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """Class probabilities ``(N, C)``: softmax averaged over ensemble members and flip views."""
    import torch
    from monai.data import DataLoader

    from medpipe.models.segmentation import autocast

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for batch in loader:
            x = batch["image"]
            x = (x.as_tensor() if hasattr(x, "as_tensor") else x).float().to(device)
            total = None
            n = 0
            for net in nets:
                for view in flip_views(x, tta_axes):
                    with autocast(device, amp):
                        p = torch.softmax(net(view).float(), dim=1)
                    total = p if total is None else total + p
                    n += 1
            assert total is not None
            out.append((total / n).cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def valid_tta_axes(axes: list[int] | None, spatial_dims: int) -> list[int] | None:
    if axes is None:
        return None
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad:
        raise StageError(f"tta_axes: {bad} are not spatial axes of {spatial_dims}D images (0..{spatial_dims - 1})")
    return list(axes)
