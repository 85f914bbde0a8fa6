"""Typed network configurations: one list of names and defaults, stored dicts of old checkpoints still load."""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch

from medpipe.models.classification import build_classifier
from medpipe.models.classification_config import CLASSIFIERS, ClassifierConfig, ClassifierOptions, classifier_config
from medpipe.models.gan import build_generator
from medpipe.models.gan_config import GanConfig, GanOptions, gan_config
from medpipe.models.segmentation import (
    SEGMENTERS,
    SegmenterConfig,
    SegmenterOptions,
    build_from_config,
    segmenter_config,
)
from medpipe.stages.train_classifier import TrainClassifierParams
from medpipe.stages.train_gan import TrainGanParams
from medpipe.stages.train_segmenter import TrainSegmenterParams

#: dictionaries as checkpoints written before the typed configurations stored them
OLD_CLASSIFIER = {"name": "resnet18", "spatial_dims": 2, "in_channels": 1, "num_classes": 2, "dropout": 0.0,
                  "norm": "batch", "stem": "small", "stem_stride": 2, "widen_factor": 0.125}
OLD_DENSENET = {"name": "densenet121", "spatial_dims": 2, "in_channels": 1, "num_classes": 3, "dropout": 0.1,
                "norm": "batch"}
OLD_GAN = {"image_size": [28, 28], "in_channels": 1, "num_classes": 1, "latent_dim": 64, "g_channels": 16,
           "d_channels": 32, "embed_dim": 64, "d_norm": "spectral", "minibatch_std": True, "g_upsample": "resize"}
OLD_SEGMENTER = {"name": "unet", "in_channels": 2, "out_channels": 3, "channels": [4, 8], "strides": [2],
                 "num_res_units": 0, "norm": "instance", "dropout": 0.0}


def test_stage_params_use_the_one_list_of_names_and_defaults() -> None:
    assert get_args(TrainClassifierParams.model_fields["model"].annotation) == CLASSIFIERS
    assert get_args(TrainSegmenterParams.model_fields["model"].annotation) == SEGMENTERS
    for params, options in ((TrainClassifierParams, ClassifierOptions), (TrainSegmenterParams, SegmenterOptions),
                            (TrainGanParams, GanOptions)):
        for name, f in options.model_fields.items():
            assert params.model_fields[name].default == f.default, name
    # the stage's defaults are the configuration's defaults
    p = TrainClassifierParams()
    cfg = classifier_config(p.model, 2, 1, 2, **p.model_dump(include=set(ClassifierOptions.model_fields)))
    assert cfg == classifier_config("resnet18", 2, 1, 2)


def test_old_checkpoint_dicts_round_trip_unchanged() -> None:
    for old in (OLD_CLASSIFIER, OLD_DENSENET):
        assert ClassifierConfig.from_dict(old).to_dict() == old
        assert classifier_config(**{k: v for k, v in old.items() if k not in ("spatial_dims", "in_channels",
                                                                                "num_classes", "name")},
                                 name=old["name"], spatial_dims=2, in_channels=old["in_channels"],
                                 num_classes=old["num_classes"]) == old
    assert SegmenterConfig.from_dict(OLD_SEGMENTER).to_dict() == OLD_SEGMENTER
    assert GanConfig.from_dict(OLD_GAN).to_dict() == OLD_GAN == gan_config(28, 1, 1)
    assert build_generator(OLD_GAN, seed=0).cfg == OLD_GAN
    assert json.loads(json.dumps(segmenter_config("segresnet", 1, 2))) == segmenter_config("segresnet", 1, 2)


def test_builders_take_old_dicts_and_config_objects_alike() -> None:
    torch.manual_seed(0)
    a = build_classifier(OLD_CLASSIFIER)
    torch.manual_seed(0)
    b = build_classifier(ClassifierConfig.from_dict(OLD_CLASSIFIER))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    net = build_from_config({**OLD_SEGMENTER, "unknown_future_key": 1})  # checkpoint dicts: extra keys ignored
    assert net(torch.zeros(1, 2, 8, 8, 8)).shape == (1, 3, 8, 8, 8)


def test_bad_configurations_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown classifier 'resnet19'"):
        classifier_config("resnet19", 2, 1, 2)
    with pytest.raises(ValueError, match="widen_factor"):
        classifier_config("resnet18", 2, 1, 2, widen_factor=0)
    with pytest.raises(TypeError, match="stemm"):
        classifier_config("resnet18", 2, 1, 2, stemm="small")
    with pytest.raises(ValueError, match="SegResNet always downsamples by 2"):
        segmenter_config("segresnet", 1, 2, channels=(4, 8), strides=(1,))
    with pytest.raises(ValueError, match="^channels: at least 2 levels"):
        SegmenterConfig.from_dict({"name": "unet", "in_channels": 1, "out_channels": 2, "channels": [4]})
