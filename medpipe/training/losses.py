"""Losses of the supervised trainers: the classifier's (per class-imbalance option) and the segmenter's."""

from __future__ import annotations

from typing import Any, Literal

from medpipe.training.imbalance import inverse_frequency_weights

Imbalance = Literal["none", "weighted_sampler", "class_weights", "focal"]


def make_loss(kind: Imbalance, counts: Any, *, gamma: float = 2.0, label_smoothing: float = 0.0) -> Any:
    """The classifier loss for ``imbalance`` (logits ``(B, C)``, integer targets ``(B,)``).

    ``class_weights``: cross-entropy weighted ``n / (n_classes * count(class))`` per class; ``focal``:
    ``monai.losses.FocalLoss`` (``gamma``); otherwise plain cross-entropy (``label_smoothing``).
    """
    import torch
    from torch import nn

    if kind == "focal":
        from monai.losses import FocalLoss

        focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma)

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return focal(logits, target.view(-1, 1))

        return loss
    weight = torch.as_tensor(inverse_frequency_weights(counts), dtype=torch.float32) if kind == "class_weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def segmenter_loss(batch_dice: bool = False) -> Any:
    """Dice + cross-entropy on softmax logits and integer label maps (``monai.losses.DiceCELoss``).

    ``batch_dice``: the Dice over the whole batch, not per patch (steadier when patches without
    foreground are sampled).
    """
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=batch_dice)
