"""FID and the generated-class rate against values worked out by hand (tests mutation testing found missing).

Two feature sets that differ by a constant shift ``c`` have equal covariances, so their Fréchet distance
is exactly ``|c|^2``; a set against itself is 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medpipe.metrics.generative import class_rate, features_and_classes, fid, matched_fid


def _features(n: int, seed: int, d: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)))


def test_fid_by_hand() -> None:
    a = _features(50, 0)
    shift = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    v = fid(a, a + shift)
    assert type(v) is float and v == pytest.approx(25.0, rel=1e-6)
    assert fid(a[:2], (a + shift)[:2]) is not None
    assert fid(a[:1], a) is None and fid(a, a[:1]) is None and fid(a[:0], a[:0]) is None


def test_matched_fid_averages_fid_over_the_seeded_subsets() -> None:
    real = _features(40, 1)
    fake = _features(30, 2) + 1.0
    gen = torch.Generator().manual_seed(5)
    expected = [fid(real, fake[torch.randperm(30, generator=gen)[:8]]) for _ in range(10)]
    assert matched_fid(real, fake, 8, seed=5) == pytest.approx(float(np.mean(expected)), rel=1e-9)
    gen = torch.Generator().manual_seed(5)
    three = [fid(real, fake[torch.randperm(30, generator=gen)[:8]]) for _ in range(3)]
    assert matched_fid(real, fake, 8, seed=5, repeats=3) == pytest.approx(float(np.mean(three)), rel=1e-9)
    assert matched_fid(real, fake, 30, seed=0, repeats=2) == pytest.approx(fid(real, fake), rel=1e-9)  # all of it
    assert matched_fid(real, fake, 31, seed=0) is None  # fewer generated images than the reference
    assert matched_fid(real, fake, 1, seed=0) is None
    assert matched_fid(real, fake, 2, seed=0, repeats=1) is not None


def test_class_rate() -> None:
    assert class_rate(torch.tensor([1, 0, 1, 1]), 1) == 0.75
    assert class_rate(torch.tensor([1, 0, 1, 1]), 0) == 0.25
    assert class_rate(torch.tensor([2, 2]), 1) == 0.0
    assert class_rate(torch.tensor([], dtype=torch.long), 1) is None


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(2, 3)
        self.fc = torch.nn.Linear(3, 2)
        self.head = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.relu(self.body(x))))


def test_features_are_the_input_of_the_last_linear_layer_in_batches() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(7, 2)
    feats, classes = features_and_classes(net, x, "cpu", batch=3)
    with torch.no_grad():
        hidden = torch.relu(net.body(x))
        logits = net.head(net.fc(hidden))
    assert feats.dtype == torch.float64 and feats.shape == (7, 3)
    assert torch.allclose(feats, hidden.double())
    assert torch.equal(classes, logits.argmax(1))
    assert not net.fc._forward_hooks  # the hook is removed
    # another layer, the default batch
    feats, _ = features_and_classes(net, x, "cpu", layer="head")
    with torch.no_grad():
        assert torch.allclose(feats, net.fc(hidden).double())
    assert not net.head._forward_hooks
