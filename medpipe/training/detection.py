"""Detector training pieces for :func:`medpipe.training.loop.fit`: the iteration and the validation.

:class:`DetectorStep`: one batch of patches (``no_collation`` lists of the patches each item gave)
through the ``RetinaNetDetector`` in train mode, whose loss is the classification loss (focal-free
BCE on the hard-negative-sampled anchors) plus the box regression loss (smooth L1 on the ATSS-matched
anchors), as in MONAI's LUNA16 recipe. Logs ``loss``, ``cls_loss`` and ``box_loss``.

:func:`detector_validation`: every val scan through sliding-window inference, detections matched to
the nodules as LUNA16 does (:mod:`medpipe.metrics.detection`); the kept checkpoint is the one with
the highest CPM (ties: the higher sensitivity at any threshold, then the later epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medpipe.training.loop import Logs, Validation


class DetectorStep:
    """One training iteration of a ``RetinaNetDetector`` on a list of patches."""

    def __init__(self, detector: Any, optimizer: Any, *, device: str = "cpu") -> None:
        self.detector, self.optimizer, self.device = detector, optimizer, device

    def __call__(self, batch: Any) -> Logs:
        from medpipe.data.detection import BOX, BOX_LABEL, IMAGE, plain

        patches = [p for item in batch for p in (item if isinstance(item, list) else [item])]
        images = [plain(p[IMAGE]).float().to(self.device) for p in patches]
        targets = [{BOX: plain(p[BOX]).float().reshape(-1, 6).to(self.device),
                    BOX_LABEL: plain(p[BOX_LABEL]).long().reshape(-1).to(self.device)} for p in patches]
        self.optimizer.zero_grad(set_to_none=True)
        out = self.detector(images, targets)
        cls_loss, box_loss = out[self.detector.cls_key], out[self.detector.box_reg_key]
        loss = cls_loss + box_loss
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "cls_loss": float(cls_loss.detach()), "box_loss": float(box_loss.detach())}


def scan_matches(model: Any, images: Sequence[Any], truths: Sequence[Sequence[dict[str, Any]]],
                 advance: Callable[[int], None] | None = None) -> tuple[list[Any], list[list[Any]]]:
    """Detect in every preprocessed image and match to its findings: (ScanMatch per scan, findings per scan)."""
    from medpipe.metrics.detection import match_scan

    matches, found = [], []
    for image, truth in zip(images, truths, strict=True):
        dets = model.detect(image)
        centres = np.asarray([d.center_lps for d in dets], dtype=np.float64).reshape(-1, 3)
        matches.append(match_scan(centres, [d.score for d in dets],
                                  np.asarray([f["center_lps"] for f in truth], dtype=np.float64).reshape(-1, 3),
                                  [f["diameter_mm"] for f in truth]))
        found.append(dets)
        if advance is not None:
            advance(1)
    return matches, found


def detector_validation(model: Any, images: Sequence[Any], truths: Sequence[Sequence[dict[str, Any]]]
                        ) -> Callable[[int], Validation]:
    """``epoch -> Validation`` with ``val_cpm`` and ``val_sens_1fp`` on the val scans (``model``: a
    :class:`medpipe.inference.detection.DetectionModel` sharing the trained detector); ``values`` holds the
    score threshold of 1 false positive per val scan (``threshold_at_1fp``, ``inf`` when no threshold is that
    selective)."""
    from medpipe.metrics.detection import froc

    def validate(epoch: int) -> Validation:
        matches, _ = scan_matches(model, images, truths)
        f = froc(matches)
        cpm = f.cpm if np.isfinite(f.cpm) else 0.0
        recall = float(np.max(f.sensitivity)) if f.n_nodules else 0.0
        return Validation(row={"val_cpm": round(f.cpm, 6), "val_sens_1fp": round(f.at_rates[1.0], 6)},
                          values={"threshold_at_1fp": f.threshold_at(1.0)},
                          score=(cpm, recall, float(epoch)),
                          summary=f"val CPM {f.cpm:.4f}, sensitivity at 1 FP/scan {f.at_rates[1.0]:.3f} "
                                  f"({f.n_nodules} nodules, {f.n_scans} scans)")

    return validate
