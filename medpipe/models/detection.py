"""3D object detectors (pure torch / MONAI: no file I/O): a RetinaNet on a ResNet + FPN feature extractor.

:func:`build_detector` rebuilds the network from its configuration alone
(:class:`~medpipe.models.detection_config.DetectorConfig`, torch-free, which checkpoints hold).

The pieces are MONAI's (``monai.apps.detection``), put together as in MONAI's LUNA16 tutorial:
a ``monai.networks.nets.resnet.ResNet`` backbone, an FPN on its layers ``returned_layers``
(MONAI's ``FeaturePyramidNetwork``, plus a max-pooled extra level), ``RetinaNet`` classification and box
regression heads, ``AnchorGeneratorWithAnchorShape`` anchors, and the ``RetinaNetDetector`` with
its box coder, ATSS matcher, hard negative sampler, box selector (score threshold, top-k, NMS) and
sliding-window inferer.

**Why not** ``resnet_fpn_feature_extractor``: it builds exactly this ``BackboneWithFPN`` but with 256
FPN channels, fixed; the RetinaNet heads run four 3x3x3 convolutions of that width at every pyramid
level, which is hours per epoch on a CPU. :class:`ResNetFPN` builds the same extractor
(same ``in_channels`` list and extra block) with ``fpn_channels`` wide levels, and without
torchvision, which ``BackboneWithFPN`` needs and medpipe does not depend on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medpipe.models.detection_config import DetectorConfig


class ResNetFPN(nn.Module):
    """A MONAI ResNet's layers ``returned_layers`` fed to a MONAI ``FeaturePyramidNetwork`` (with a max-pooled extra
    level): what ``BackboneWithFPN`` computes, without torchvision's ``IntermediateLayerGetter``. ``out_channels``:
    the width of every level (``RetinaNet`` reads it)."""

    def __init__(self, cfg: DetectorConfig) -> None:
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        from monai.networks.nets import resnet

        super().__init__()
        self.body = resnet.ResNet(block=resnet.ResNetBlock, layers=list(cfg.blocks), block_inplanes=list(cfg.widths),
                                  spatial_dims=3, n_input_channels=cfg.in_channels,
                                  conv1_t_size=[max(3, 2 * s + 1) for s in cfg.conv1_stride],
                                  conv1_t_stride=list(cfg.conv1_stride), num_classes=1)
        self.returned = [int(k) for k in cfg.returned_layers]
        self.fpn = FeaturePyramidNetwork(3, [cfg.widths[k - 1] for k in self.returned], cfg.fpn_channels,
                                         extra_blocks=LastLevelMaxPool(3))
        self.out_channels = cfg.fpn_channels

    def forward(self, x: Any) -> Any:
        b = self.body
        x = b.maxpool(b.act(b.bn1(b.conv1(x))))
        features = {}
        for k, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4)[:max(self.returned)], start=1):
            x = layer(x)
            if k in self.returned:
                features[str(len(features))] = x
        return self.fpn(features)


def anchor_generator(cfg: DetectorConfig) -> Any:
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    return AnchorGeneratorWithAnchorShape(feature_map_scales=[2 ** i for i in range(len(cfg.returned_layers) + 1)],
                                          base_anchor_shapes=[list(s) for s in cfg.anchor_shapes])


def _detector_class() -> Any:
    """``RetinaNetDetector`` with anchor matching by the ATSS matcher alone.

    MONAI's ``compute_anchor_matched_idxs`` first asks whether the matcher is torchvision's ``Matcher``,
    which raises without torchvision (not a medpipe dependency); the ATSS branch below is MONAI's, unchanged.
    """
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher

    class AtssRetinaNetDetector(RetinaNetDetector):  # type: ignore[misc]
        def compute_anchor_matched_idxs(self, anchors: list[Any], targets: list[dict[str, Any]],
                                        num_anchor_locs_per_level: Any) -> list[Any]:
            if not isinstance(self.proposal_matcher, ATSSMatcher):
                raise NotImplementedError("medpipe's detector matches anchors with MONAI's ATSS matcher only")
            matched = []
            for anchors_per_image, targets_per_image in zip(anchors, targets, strict=True):
                boxes = targets_per_image[self.target_box_key]
                if boxes.numel() == 0:
                    matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                              device=anchors_per_image.device))
                    continue
                _, idxs = self.proposal_matcher(boxes.to(anchors_per_image.device), anchors_per_image,
                                                num_anchor_locs_per_level, self.num_anchors_per_loc)
                matched.append(idxs)
            return matched

    return AtssRetinaNetDetector


def build_detector(config: DetectorConfig | dict[str, Any]) -> Any:
    """A ``RetinaNetDetector`` (network + anchors; box coder and box selector at MONAI's defaults).

    Training components (:func:`set_training`) and the sliding-window inferer are set by the caller.
    """
    from monai.apps.detection.networks.retinanet_network import RetinaNet

    cfg = DetectorConfig.from_dict(config)
    anchors = anchor_generator(cfg)
    net = RetinaNet(spatial_dims=3, num_classes=cfg.num_classes, num_anchors=anchors.num_anchors_per_location()[0],
                    feature_extractor=ResNetFPN(cfg), size_divisible=cfg.size_divisible)
    detector = _detector_class()(network=net, anchor_generator=anchors, debug=False)
    detector.set_target_keys(box_key="box", label_key="box_label")  # medpipe.data.detection.BOX, BOX_LABEL
    return detector


def set_training(detector: Any, *, batch_size_per_image: int = 64, positive_fraction: float = 0.3) -> None:
    """The training components of the LUNA16 recipe: ATSS matching and hard negative sampling."""
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
                                       pool_size=20, min_neg=16)


def set_inference(detector: Any, *, roi_size: tuple[int, int, int], score_thresh: float, nms_thresh: float,
                  detections_per_image: int, overlap: float = 0.25, sw_batch_size: int = 1) -> None:
    """Sliding-window inference over whole volumes and box selection: score threshold, top-k, NMS."""
    detector.set_box_selector_parameters(score_thresh=score_thresh, topk_candidates_per_level=1000,
                                         nms_thresh=nms_thresh, detections_per_img=detections_per_image)
    detector.set_sliding_window_inferer(roi_size=list(roi_size), overlap=overlap, sw_batch_size=sw_batch_size,
                                        mode="constant", device="cpu")
