"""Model packages for scoring tests, made without training: a tiny seeded network and a datalist with rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medpipe.inference.package import ModelPackage, build_segmenter_package

CT_EVAL = [
    {"LoadImaged": {"keys": ["image"]}},
    {"EnsureChannelFirstd": {"keys": ["image"]}},
    {"Orientationd": {"keys": ["image"], "axcodes": "RAS"}},
    {"NormalizeIntensityd": {"keys": ["image"], "channel_wise": True}},
]


def tiny_segmenter_package(folder: Path, *, rules: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                           classes: dict[str, str] | None = None, eval_transforms: list[dict[str, Any]] | None = None,
                           bias: float = 0.0, segment_codes: dict[str, Any] | None = None,
                           members: int = 1, min_component_ml: float | None = None) -> ModelPackage:
    """A package of an untrained 3D UNet (channels 4, 8) whose output varies over the image.

    ``rules``: channel name -> DICOM rule (default one CT channel); ``classes``: class index -> name.
    ``bias`` is added to the foreground logits (so a test can make masks fuller or emptier).
    ``members``: an ensemble of that many networks (seeds ``seed``, ``seed + 1``, ...), as a k-fold training makes;
    ``min_component_ml``: the package's post-processing.
    """
    import torch

    from medpipe.inference.checkpoint import SEGMENTER_FORMAT, SEGMENTER_VERSION, save_checkpoint
    from medpipe.models.segmentation import build_from_config

    rules = rules or {"CT": {"modality": "CT"}}
    classes = classes or {"1": "whole tumour"}
    channels = list(rules)
    cfg = {"name": "unet", "in_channels": len(channels), "out_channels": 1 + len(classes), "channels": [4, 8],
           "strides": [2], "num_res_units": 0, "norm": "instance", "dropout": 0.0}
    folder.mkdir(parents=True, exist_ok=True)
    cks = []
    for m in range(members):
        torch.manual_seed(seed + m)
        net = build_from_config(cfg)
        if bias:
            last = [mod for mod in net.modules() if isinstance(mod, torch.nn.modules.conv._ConvNd)][-1]
            if last.bias is not None:
                with torch.no_grad():
                    last.bias[1:] += bias
        ck = folder.parent / (f"{folder.name}_checkpoint.pt" if members == 1 else f"{folder.name}_fold{m}.pt")
        save_checkpoint(ck, {
            "format": SEGMENTER_FORMAT, "version": SEGMENTER_VERSION,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "model": cfg, "labels": {"target": "multiclass" if len(classes) > 1 else "whole_tumor", "label_map": None,
                                     "classes": classes},
            "channels": channels, "roi_size": [16, 16, 16], "eval_transforms": eval_transforms or CT_EVAL,
            "sw_batch_size": 4, "overlap": 0.25, "epoch": 0, "val_dice": 0.5, "seed": seed + m,
        })
        cks.append(ck)
    datalist = folder.parent / f"{folder.name}_datalist.json"
    datalist.write_text(json.dumps({"channels": channels, "reference": channels[-1], "channel_rules": rules,
                                    "train": [], "val": [], "test": []}))
    return build_segmenter_package(folder, cks, datalist, name="test segmenter", segment_codes=segment_codes,
                                   min_component_ml=min_component_ml)


CLS_EVAL = [
    {"LoadImaged": {"keys": ["image"]}},
    {"EnsureChannelFirstd": {"keys": ["image"]}},
    {"Orientationd": {"keys": ["image"], "axcodes": "RAS"}},
    {"NormalizeIntensityd": {"keys": ["image"], "channel_wise": True}},
    {"Resized": {"keys": ["image"], "spatial_size": [16, 16, 8], "mode": "trilinear"}},
]


def tiny_classifier_package(folder: Path, *, seed: int = 0, threshold: float = 0.5) -> ModelPackage:
    """A package of an untrained quarter-width 3D ResNet-18 (binary) on one CT channel."""
    import torch

    from medpipe.inference.checkpoint import write_classifier_checkpoint
    from medpipe.inference.package import build_classifier_package
    from medpipe.models.classification import build_classifier
    from medpipe.models.classification_config import classifier_config

    cfg = classifier_config("resnet18", 3, 1, 2, stem="small", widen_factor=0.25)
    torch.manual_seed(seed)
    net = build_classifier(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    ck = folder.parent / f"{folder.name}_classifier.pt"
    write_classifier_checkpoint(ck, net=net, model=cfg, names={0: "no tumour", 1: "tumour"}, input_shape=[1, 16, 16, 8],
                                eval_transforms=CLS_EVAL, record={"epoch": 0, "seed": seed})
    datalist = folder.parent / f"{folder.name}_datalist.json"
    datalist.write_text(json.dumps({"channels": ["CT"], "reference": "CT", "channel_rules": {"CT": {"modality": "CT"}},
                                    "train": [], "val": [], "test": []}))
    return build_classifier_package(folder, [ck], datalist, name="test classifier", threshold=threshold,
                                    class_codes={"1": {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"}})
