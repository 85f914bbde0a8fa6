"""Segmentation inference: a segmenter (or an ensemble of fold segmenters) loaded once, applied per study.

:class:`SegmentationModel` loads its checkpoint(s) once and holds what they say about the input (channel
names, eval transforms, patch size) and output (classes). For each transformed study it runs
sliding-window inference (Gaussian-weighted windows, ``monai.inferers``), optionally averaged over
flips along each axis (test-time augmentation) and over ensemble members, and puts the class
probabilities back on the **source grid**: inference runs on the eval transforms' output
(reoriented, resampled, cropped), and the probabilities are resampled onto the reference volume's
grid through the affines MONAI tracks (``MetaTensor.affine``, voxel -> RAS world), zero outside the
transformed field of view; the argmax is taken there. So masks and scores are always on the grid
of the volume ingest wrote. ``evaluate``, ``predict`` and ``medpipe score`` call it; training's
validation uses :func:`infer_probabilities`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from medpipe.errors import StageError
from medpipe.inference.checkpoint import Members
from medpipe.inference.device import autocast

#: flips used by test-time augmentation (spatial axes of a ``(B, C, X, Y, Z)`` tensor)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((2,), (3,), (4,))


def infer_probabilities(net: Any, image: Any, roi_size: Sequence[int], *, sw_batch_size: int = 4,
                        overlap: float = 0.25, tta: bool = False, device: str = "cpu", amp: bool = False) -> Any:
    """Softmax probabilities ``(B, classes, ...)`` of ``image`` ``(B, C, ...)`` by sliding windows.

    With ``tta`` the probabilities are averaged over the image and its flips along each spatial axis.
    The result is a plain float32 tensor on the CPU; the network's train/eval mode is restored.
    """
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    was_training = net.training
    net.eval()
    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    x = x.to(device)

    def run(t: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = cast(torch.Tensor, sliding_window_inference(t, list(roi_size), sw_batch_size, net,
                                                                 overlap=overlap, mode="gaussian"))
        return torch.softmax(logits.float(), dim=1)

    with torch.no_grad():
        prob = run(x)
        if tta:
            for axes in TTA_FLIPS:
                prob += torch.flip(run(torch.flip(x, axes)), axes)
            prob /= 1 + len(TTA_FLIPS)
    if was_training:
        net.train()
    return prob.cpu()


def probabilities_on_grid(prob: Any, affine: Any, grid: Any) -> np.ndarray:
    """Resample class probabilities ``(C, ...)`` (voxel -> RAS ``affine``) onto ``grid``: ``(C, *grid.shape)``.

    Trilinear; zero outside the transformed field of view (so such voxels become background).
    """
    from medpipe.data.volumes import resample_to_grid

    p = prob.detach().cpu().numpy() if hasattr(prob, "detach") else np.asarray(prob)
    a = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    if a.ndim == 3:
        a = a[0]
    if p.shape[1:] == tuple(grid.shape) and np.allclose(a, grid.affine, atol=1e-4):
        return p.astype(np.float32, copy=False)
    return np.stack([resample_to_grid(c.astype(np.float32), a, grid, order=1, cval=0.0) for c in p])


@dataclass
class Segmentation:
    """One study's result on the reference grid."""

    mask: np.ndarray  # uint8 class map, the grid's shape
    probabilities: np.ndarray  # float32 (classes, *grid shape), background first
    grid: Any  # medpipe.data.volumes.GridSpec
    removed_components: int = 0  # foreground components below min_component_ml set to background


class SegmentationModel(Members):
    """A trained segmenter, or the mean of an ensemble of them (k-fold members), loaded once.

    Members must agree on channels, classes, patch size and eval transforms (one training stage made
    them). Use :meth:`load`; the networks stay on ``device`` in eval mode.
    """

    @classmethod
    def load(cls, paths: Path | str | Sequence[Path | str], device: str = "cpu", amp: bool = False
             ) -> SegmentationModel:
        """Load one checkpoint or the members of an ensemble.

        Raises:
            StageError: a file is not a medpipe segmenter checkpoint, or the members disagree.
        """
        from medpipe.inference.checkpoint import load_members, load_segmenter

        plist = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        nets, doc = load_members(plist, device, load_segmenter, ("channels", "labels", "roi_size", "eval_transforms"),
                                 "segmenter")
        return cls(nets, doc, plist, device, amp)

    # -- what the checkpoint says ---------------------------------------------------------------------

    @property
    def channels(self) -> list[str]:
        return list(self.doc.get("channels") or [])

    @property
    def labels(self) -> dict[str, Any]:
        """The label mapping of :func:`medpipe.data.labels.label_info` (``classes``: class index -> name)."""
        return cast(dict[str, Any], self.doc["labels"])

    @property
    def classes(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.labels["classes"].items()}

    @property
    def roi_size(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.doc["roi_size"])

    @property
    def eval_transforms(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.doc["eval_transforms"])

    @property
    def inference(self) -> dict[str, Any]:
        """How the training stage meant the model to be applied: ``{"tta": bool, "min_component_ml": float | None}``
        (older checkpoints: no TTA, no post-processing)."""
        got = self.doc.get("inference") or {}
        return {"tta": bool(got.get("tta", False)), "min_component_ml": got.get("min_component_ml")}

    @property
    def component_rule(self) -> dict[str, Any]:
        """How small components are told (the training stage's ``package.components`` and
        ``package.min_component_fraction``): ``{"per_class": bool, "min_fraction": float | None}``."""
        got = self.doc.get("inference") or {}
        return {"per_class": got.get("components") == "class", "min_fraction": got.get("min_component_fraction")}

    def settings(self, tta: bool | None = None, min_component_ml: float | None = None) -> dict[str, Any]:
        """The inference settings to use: the given ones, else the model's (:attr:`inference`); 0 mL: none."""
        own = self.inference
        return {"tta": own["tta"] if tta is None else bool(tta),
                "min_component_ml": own["min_component_ml"] if min_component_ml is None else (min_component_ml or None)}

    def transforms(self, spec: list[dict[str, Any]] | None = None, *, labelled: bool = True) -> Any:
        """The Compose of ``spec`` (default: the checkpoint's eval transforms); ``labelled=False`` tolerates
        items without a ``label`` key."""
        from medpipe.data.transforms import build_transforms, tolerate_missing_keys

        chosen = self.eval_transforms if spec is None else spec
        return build_transforms(chosen if labelled else tolerate_missing_keys(chosen))

    # -- inference ------------------------------------------------------------------------------------

    def probabilities(self, image: Any, *, tta: bool = False) -> Any:
        """Mean softmax ``(classes, ...)`` over members (and flips) of one transformed image ``(C, ...)``."""
        total = None
        for net in self.nets:
            p = infer_probabilities(net, image[None].float(), self.roi_size,
                                    sw_batch_size=int(self.doc.get("sw_batch_size", 4)),
                                    overlap=float(self.doc.get("overlap", 0.25)), tta=tta, device=self.device,
                                    amp=self.amp)[0]
            total = p if total is None else total + p
        assert total is not None  # load() refuses an empty ensemble
        return total / len(self.nets)

    def segment(self, data: dict[str, Any], grid: Any, *, tta: bool | None = None,
                min_component_ml: float | None = None) -> Segmentation:
        """Class map and probabilities on ``grid`` of one item after the eval transforms (``data["image"]``).

        ``tta`` / ``min_component_ml``: None uses the model's settings (:attr:`inference`); ``min_component_ml=0``
        removes nothing.
        """
        from monai.data import MetaTensor

        from medpipe.inference.postprocess import remove_small_components

        image = data["image"]
        affine = image.affine if isinstance(image, MetaTensor) else None
        if affine is None:
            raise StageError("the eval transforms lost the image geometry (no affine); keep MONAI's metadata "
                             "(do not end with ToNumpyd / EnsureTyped(track_meta=False))")
        tensor = image.as_tensor() if isinstance(image, MetaTensor) else image
        chosen = self.settings(tta, min_component_ml)
        native = probabilities_on_grid(self.probabilities(tensor, tta=chosen["tta"]), affine, grid)
        voxel_ml = float(np.prod([float(s) for s in grid.spacing])) / 1000.0
        mask, removed = remove_small_components(native.argmax(0).astype(np.uint8), voxel_ml,
                                                chosen["min_component_ml"], **self.component_rule)
        return Segmentation(mask, native, grid, removed)
