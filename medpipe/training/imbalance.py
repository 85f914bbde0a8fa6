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


class EpochWeightedSampler:
    """The distributed ``weighted_sampler``: each epoch draws ``num_samples`` items with replacement (weight
    ``weights[i]``) from a generator seeded with ``seed + epoch`` (:meth:`set_epoch`), the same draw on every
    rank, and gives rank ``rank`` every ``num_replicas``-th of them (the draw is padded to a multiple of
    ``num_replicas`` so that every rank gets as many). Its order depends on the seed and the epoch only."""

    def __init__(self, weights: Any, num_samples: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        import torch

        self.weights = torch.as_tensor(list(weights), dtype=torch.double)
        self.per_rank = -(-int(num_samples) // num_replicas)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Any:
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.num_replicas, replacement=True, generator=g)
        return iter(drawn[self.rank::self.num_replicas].tolist())
