"""medpipe checkpoints: ``torch.load(weights_only=True)``-readable dictionaries with everything to rebuild a model.

A segmenter checkpoint holds the weights, the network configuration
(:func:`medpipe.models.segmentation.segmenter_config`), the classes and label mapping
(:func:`medpipe.data.labels.label_info`), the channel names, ``roi_size`` and the eval transforms. A
classifier checkpoint holds the weights, the network configuration
(:func:`medpipe.models.classification.classifier_config`), the class names, the input shape, the eval
transforms and the training record; a k-fold run writes one per fold: the ensemble. A GAN generator
checkpoint holds the moving-average generator's weights, its configuration
(:func:`medpipe.models.gan.gan_config`), the classes it makes and the training record. Each format is
written by one function here (``write_*_checkpoint``) and read by one (``load_*`` / ``read_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.errors import StageError
from medpipe.io import atomic_path


def save_checkpoint(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` with ``torch.save``, atomically and byte-reproducibly.

    ``torch.save`` to a path names the zip archive inside after the file, and the atomic write goes
    through a random temporary name: serialising to memory first keeps the archive name fixed, so the
    same tensors give the same bytes (and a model package the same id).
    """
    import io

    import torch

    buf = io.BytesIO()
    torch.save(doc, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_checkpoint(path: Path | str, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The document of a medpipe checkpoint of format ``fmt`` (tensors only: ``weights_only=True``).

    Raises:
        StageError: unreadable, another kind of file (``what`` names the expected one), or newer than ``version``.
    """
    import torch

    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a user problem here
        raise StageError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise StageError(f"{path} is not a {what}")
    if int(doc.get("version", 0)) > version:
        raise StageError(f"{what} {path} was written by a newer medpipe (format {doc.get('version')})")
    return doc


SEGMENTER_FORMAT = "medpipe-segmenter"
SEGMENTER_VERSION = 1


def _weights(net: Any) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def write_segmenter_checkpoint(path: Path, *, net: Any, model: dict[str, Any], labels: dict[str, Any],
                               channels: list[str], roi_size: list[int], eval_transforms: list[dict[str, Any]],
                               sw_batch_size: int, overlap: float, record: dict[str, Any]) -> None:
    """A segmenter checkpoint: weights, network configuration (``model``: a stored ``SegmenterConfig``), label
    mapping (``labels``: :func:`medpipe.data.labels.label_info`), channel names, sliding-window settings, eval
    transforms and the training ``record`` (epoch, val_dice, datalist, seed)."""
    save_checkpoint(path, {
        "format": SEGMENTER_FORMAT, "version": SEGMENTER_VERSION, "state_dict": _weights(net),
        "model": model, "labels": labels, "channels": channels, "roi_size": list(roi_size),
        "eval_transforms": eval_transforms, "sw_batch_size": sw_batch_size, "overlap": overlap, **record,
    })


def load_segmenter(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """``(network in eval mode on device, checkpoint document)``; loads tensors only (``weights_only``)."""

    from medpipe.models.segmentation import build_from_config

    doc = read_checkpoint(path, SEGMENTER_FORMAT, SEGMENTER_VERSION, "medpipe segmenter checkpoint")
    net = build_from_config(doc["model"])
    net.load_state_dict(doc["state_dict"])
    net.to(device).eval()
    return net, doc


CLASSIFIER_FORMAT = "medpipe-classifier"


CLASSIFIER_VERSION = 1


def write_classifier_checkpoint(path: Path, *, net: Any, model: dict[str, Any], names: dict[int, str],
                                input_shape: list[int], eval_transforms: list[dict[str, Any]],
                                record: dict[str, Any]) -> None:
    """A classifier checkpoint: weights, network configuration (``model``: a stored ``ClassifierConfig``), class
    names, input shape, eval transforms and the training ``record`` (epoch, val_auc, fold, ...)."""
    save_checkpoint(path, {
        "format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION,
        "state_dict": _weights(net),
        "model": model, "class_names": {str(k): v for k, v in names.items()}, "input_shape": input_shape,
        "eval_transforms": eval_transforms, **record,
    })


def record_decision(path: Path, decision: dict[str, Any]) -> None:
    """Add the binary decision chosen after training (``{"threshold", "rule", "positive_class", ...}``) to a
    classifier checkpoint, rewritten atomically (the weights are unchanged)."""
    doc = read_checkpoint(path, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "medpipe classifier checkpoint")
    doc["decision"] = dict(decision)
    save_checkpoint(path, doc)


def load_classifier(path: Path | str, device: str) -> tuple[Any, dict[str, Any]]:
    """``(network in eval mode on device, checkpoint document)``; loads tensors only (``weights_only``)."""
    from medpipe.models.classification import build_classifier

    doc = read_checkpoint(path, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "medpipe classifier checkpoint")
    net = build_classifier(doc["model"])
    net.load_state_dict(doc["state_dict"])
    net.to(device).eval()
    return net, doc


@dataclass
class Members:
    """The networks of a model (one, or the members of a k-fold ensemble) loaded once, with the first
    member's checkpoint document; base of the inference models."""

    nets: list[Any]
    doc: dict[str, Any]
    paths: list[Path]
    device: str
    amp: bool = False


def load_members(paths: Sequence[Path | str], device: str, loader: Any, agree: tuple[str, ...], what: str
                 ) -> tuple[list[Any], dict[str, Any]]:
    """``loader(path, device) -> (net, doc)`` for every path; the members must agree on the ``agree`` keys.

    Raises:
        StageError: no path, or members that disagree (they were not trained in one stage).
    """
    if not paths:
        raise StageError(f"no {what} checkpoint given")
    nets, docs = [], []
    for p in paths:
        net, doc = loader(p, device)
        nets.append(net)
        docs.append(doc)
    for member, d in zip(paths[1:], docs[1:], strict=True):
        for key in agree:
            if d.get(key) != docs[0].get(key):
                raise StageError(f"ensemble member {member} differs from {paths[0]} in {key}; train them in one stage")
    return nets, docs[0]


def load_ensemble(paths: Sequence[Path | str], device: str) -> tuple[list[Any], dict[str, Any]]:
    """The networks of one or more classifier checkpoints (one per fold) and the first one's document.

    Raises:
        StageError: the members disagree on classes, input shape or eval transforms.
    """
    return load_members(paths, device, load_classifier, ("class_names", "input_shape", "eval_transforms"),
                        "classifier")


def write_gan_checkpoint(path: Path, *, generator: Any, model: dict[str, Any], classes: list[int],
                         names: dict[int, str], image_size: list[int], in_channels: int, target_class: int,
                         record: dict[str, Any]) -> None:
    """A GAN generator checkpoint (``medpipe.models.gan.GAN_FORMAT``): the generator's weights, its
    configuration (``model``: :func:`medpipe.models.gan.gan_config`), the class of each generator index
    (``classes``), class names, image size, channels, target class, value range ``[-1, 1]`` and the training
    ``record`` (seed, epochs, datalist, metrics)."""
    from medpipe.models.gan_config import GAN_FORMAT, GAN_VERSION

    save_checkpoint(path, {
        "format": GAN_FORMAT, "version": GAN_VERSION, "state_dict": _weights(generator), "model": model,
        "classes": list(classes), "class_names": {str(k): v for k, v in names.items()}, "image_size": image_size,
        "in_channels": in_channels, "target_class": target_class, **record, "value_range": [-1.0, 1.0],
    })


def load_generator(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """``(generator in eval mode on device, checkpoint document)``; loads tensors only (``weights_only``)."""

    from medpipe.models.gan import build_generator
    from medpipe.models.gan_config import GAN_FORMAT, GAN_VERSION

    doc = read_checkpoint(path, GAN_FORMAT, GAN_VERSION, "medpipe GAN generator (train_gan's generator.pt)")
    net = build_generator(doc["model"])
    net.load_state_dict(doc["state_dict"])
    return net.to(device).eval(), doc
