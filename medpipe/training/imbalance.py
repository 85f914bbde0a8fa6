"""Class imbalance: inverse-frequency class weights, per-item sampling weights and the weighted sampler."""

from __future__ import annotations

from typing import Any

import numpy as np


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


def make_sampler(kind: str, classes: list[int], counts: np.ndarray, seed: int) -> Any:
    """A ``WeightedRandomSampler`` for ``weighted_sampler`` (``len(classes)`` draws with replacement per epoch,
    seeded), else None (plain shuffling)."""
    import torch

    if kind != "weighted_sampler":
        return None
    weights = sample_weights(classes, counts).tolist()
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(classes), replacement=True,
                                                  generator=torch.Generator().manual_seed(seed))
