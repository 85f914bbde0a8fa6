"""Detector checkpoints and inference: whole volumes in, findings (centre in LPS mm, diameter, score) out.

A detector checkpoint (``torch.load(weights_only=True)``-readable) holds the network's weights and
configuration (:class:`medpipe.models.detection_config.DetectorConfig`), the preprocessing (``pixdim``,
``hu_window``) and the inference settings (sliding-window ``roi_size``, ``overlap``, score threshold,
NMS threshold, detections per scan): :class:`DetectionModel` needs nothing else.

Inference runs MONAI's ``RetinaNetDetector`` with its sliding-window inferer over the whole
preprocessed volume (the heads' maps are stitched, then anchors are decoded, thresholded, kept per
level by top-k and de-duplicated by box NMS); each box's centre goes back to world space through
the preprocessed image's affine (:func:`medpipe.data.detection.box_centres_world`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import StageError
from medpipe.inference.checkpoint import read_checkpoint, save_checkpoint

DETECTOR_FORMAT = "medpipe-detector"
DETECTOR_VERSION = 1


@dataclass(frozen=True)
class Finding:
    """One detection: centre (DICOM patient coordinates LPS, mm), diameter (mm), score (0-1)."""

    center_lps: tuple[float, float, float]
    diameter_mm: float
    score: float


def write_detector_checkpoint(path: Path, *, net: Any, model: dict[str, Any], preprocessing: dict[str, Any],
                              inference: dict[str, Any], record: dict[str, Any]) -> None:
    save_checkpoint(path, {
        "format": DETECTOR_FORMAT, "version": DETECTOR_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "model": model, "preprocessing": preprocessing, "inference": inference, "record": record})


class DetectionModel:
    """A trained detector ready to run on volumes (``detector``: a MONAI ``RetinaNetDetector`` in eval mode)."""

    def __init__(self, detector: Any, preprocessing: dict[str, Any], inference: dict[str, Any], device: str,
                 record: dict[str, Any] | None = None) -> None:
        from medpipe.models.detection import set_inference

        self.detector, self.preprocessing, self.inference, self.device = detector, preprocessing, inference, device
        self.record = record or {}
        set_inference(detector, roi_size=tuple(inference["roi_size"]), score_thresh=inference["score_thresh"],
                      nms_thresh=inference["nms_thresh"], detections_per_image=inference["detections_per_image"],
                      overlap=inference["overlap"])
        self._transform: Any = None

    @classmethod
    def load(cls, path: Path | str, device: str = "cpu") -> DetectionModel:
        from medpipe.models.detection import build_detector

        doc = read_checkpoint(path, DETECTOR_FORMAT, DETECTOR_VERSION, "detector checkpoint")
        try:
            detector = build_detector(doc["model"])
        except ValueError as exc:
            raise StageError(f"detector checkpoint {path}: {exc}") from exc
        detector.network.load_state_dict(doc["state_dict"])
        detector.to(device).eval()
        return cls(detector, doc["preprocessing"], doc["inference"], device, doc.get("record"))

    def transform(self) -> Any:
        """The preprocessing of an image file without findings (cached)."""
        from medpipe.data.detection import detector_transforms

        if self._transform is None:
            self._transform = detector_transforms(pixdim=self.preprocessing["pixdim"],
                                                  hu_window=self.preprocessing["hu_window"], train=False,
                                                  with_boxes=False)
        return self._transform

    def preprocess(self, item: dict[str, Any]) -> dict[str, Any]:
        """A datalist item (``image``: the file, or a one-channel list) with ``image`` preprocessed (``medpipe score``)."""
        from medpipe.data.detection import detection_item

        return {**item, "image": self.transform()({"image": detection_item(item)["image"]})["image"]}

    def detect(self, image: Any) -> list[Finding]:
        """Findings in a preprocessed image (a ``(1, x, y, z)`` MetaTensor, RAS, as :meth:`transform` gives), highest
        score first."""
        import torch

        from medpipe.data.detection import box_centres_world, plain

        affine = np.asarray(image.affine, dtype=np.float64)
        self.detector.eval()
        with torch.no_grad():
            out = self.detector([plain(image).float().to(self.device)], use_inferer=True)[0]
        boxes = out[self.detector.target_box_key].detach().cpu().numpy()
        scores = out[self.detector.pred_score_key].detach().cpu().numpy()
        centres, diameters = box_centres_world(boxes, affine)
        order = np.argsort(-scores, kind="stable")
        return [Finding((float(centres[i, 0]), float(centres[i, 1]), float(centres[i, 2])), float(diameters[i]),
                        float(scores[i])) for i in order]

    def detect_file(self, path: Path | str) -> list[Finding]:
        """Findings in a NIfTI volume (RAS affine, HU)."""
        return self.detect(self.transform()({"image": str(path)})["image"])
