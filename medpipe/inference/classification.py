"""Classifier inference: a classifier (or a k-fold ensemble) loaded once; probabilities averaged over
members and flip views (test-time augmentation). ``evaluate_classifier``, ``explain``, training's
validation and ``medpipe score`` call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from medpipe.errors import StageError
from medpipe.inference.checkpoint import Members
from medpipe.inference.device import autocast


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
            assert total is not None  # nets is never empty
            out.append((total / n).cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def valid_tta_axes(axes: list[int] | None, spatial_dims: int) -> list[int] | None:
    if axes is None:
        return None
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad:
        raise StageError(f"tta_axes: {bad} are not spatial axes of {spatial_dims}D images (0..{spatial_dims - 1})")
    return list(axes)


class ClassificationModel(Members):
    """A trained classifier or the ensemble of a k-fold run, loaded once (:meth:`load`)."""

    @classmethod
    def load(cls, paths: Path | str | Sequence[Path | str], device: str = "cpu", amp: bool = False
             ) -> ClassificationModel:
        """Raises: StageError: not medpipe classifier checkpoints, or members that disagree."""
        from medpipe.inference.checkpoint import load_ensemble

        plist = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        nets, doc = load_ensemble(plist, device)
        return cls(nets, doc, plist, device, amp)

    @property
    def config(self) -> dict[str, Any]:
        """The network configuration (:func:`medpipe.models.classification.classifier_config`)."""
        return cast(dict[str, Any], self.doc["model"])

    @property
    def spatial_dims(self) -> int:
        return int(self.config["spatial_dims"])

    @property
    def class_names(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.doc.get("class_names") or {}).items()}

    @property
    def eval_transforms(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.doc["eval_transforms"])

    @property
    def tta_axes(self) -> list[int] | None:
        """The flip TTA the training stage set for this model (``package.tta``); None: none."""
        axes = (self.doc.get("inference") or {}).get("tta_axes")
        return None if axes is None else [int(a) for a in axes]

    @property
    def decision(self) -> tuple[int, float] | None:
        """Binary: ``(positive class, threshold)`` chosen after training (``threshold_rule``); None when not recorded."""
        d = self.doc.get("decision")
        if not d:
            return None
        return int(d["positive_class"]), float(d["threshold"])

    def threshold_for(self, positive: int) -> float | None:
        """The recorded threshold expressed on ``P(positive)`` (``1 - t`` when it was chosen on the other class's
        probability); None when none is recorded."""
        d = self.decision
        if d is None:
            return None
        pos, thr = d
        return thr if pos == positive else 1.0 - thr

    def predict_proba(self, dataset: Any, *, tta_axes: list[int] | None = None, batch_size: int = 32) -> np.ndarray:
        """``(N, C)`` probabilities of a dataset of ``{"image": ...}`` items after the eval transforms."""
        return predict_proba(self.nets, dataset, device=self.device, amp=self.amp,
                             tta_axes=valid_tta_axes(tta_axes, self.spatial_dims), batch_size=batch_size)
