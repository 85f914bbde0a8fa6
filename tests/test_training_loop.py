"""The training loop (medpipe.training.loop.fit) on tiny models: cadence, keep-best, patience, AMP, history."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
import torch

from medpipe.errors import StageError
from medpipe.training.gan import gan_summary
from medpipe.training.loop import FitResult, ShuffledBatches, SupervisedStep, Validation, fit, resolve_amp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5]) > 0).long()
    return x, y


def _setup(seed: int = 0, lr: float = 0.1) -> tuple[torch.nn.Module, Any, SupervisedStep, ShuffledBatches]:
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x, y = _data()
    step = SupervisedStep(net, torch.nn.CrossEntropyLoss(), opt, lambda b: b)
    return net, opt, step, ShuffledBatches([x, y], 8, torch.Generator().manual_seed(seed))


def _scripted(scores: list[float | None], calls: list[int]) -> Any:
    """A validation returning the given scores by epoch (index = epoch, so index 0 serves validate_first)."""

    def validate(epoch: int) -> Validation:
        calls.append(epoch)
        s = scores[epoch]
        return Validation({"val_score": s}, None if s is None else (s,), f"score {s}")

    return validate


def _fit(scores: list[float | None], epochs: int, **kw: Any) -> tuple[FitResult, list[int], list[int]]:
    _, _, step, batches = _setup()
    calls: list[int] = []
    kept: list[int] = []
    result = fit(step, batches, epochs=epochs, validate=_scripted(scores, calls), val_columns=("val_score",),
                 on_best=lambda e, v: kept.append(e), **kw)
    return result, calls, kept


# -- validation cadence ------------------------------------------------------------------------------------


def test_validation_every_n_epochs_and_after_the_last() -> None:
    result, calls, _ = _fit([0.1] * 8, 7, val_every=3)
    assert calls == [3, 6, 7]
    assert [r["epoch"] for r in result.history] == list(range(1, 8))
    assert [r["val_score"] is not None for r in result.history] == [False, False, True, False, False, True, True]


def test_validate_first_adds_an_epoch_zero_row() -> None:
    result, calls, _ = _fit([0.3, 0.1, 0.2], 2, validate_first=True, summary_columns=("loss",))
    assert calls == [0, 1, 2]
    row0 = result.history[0]
    assert row0["epoch"] == 0 and row0["loss"] is None and row0["val_score"] == 0.3 and row0["seconds"] == 0.0


def test_without_validation_nothing_is_kept() -> None:
    _, _, step, batches = _setup()
    result = fit(step, batches, epochs=2)
    assert result.best is None and result.best_epoch == 0 and result.epochs == 2 and not result.stopped_early
    assert all("val_score" not in r for r in result.history)


# -- keep-best ------------------------------------------------------------------------------------------------


def test_keep_best_keeps_strictly_better_scores_only() -> None:
    result, _, kept = _fit([None, 0.5, 0.7, 0.6, 0.7, 0.9], 5)
    assert kept == [1, 2, 5]  # the tie at epoch 4 does not replace epoch 2
    assert result.best_epoch == 5 and result.best is not None and result.best.row["val_score"] == 0.9


def test_keep_best_floor_and_never_kept_scores() -> None:
    _, _, kept = _fit([None, 0.5, 0.7, 0.6, 0.85, 0.9], 5, floor=(0.8,))
    assert kept == [4, 5]
    result, _, kept = _fit([None, None, None, 0.2], 3)  # None: e.g. a NaN Dice, never kept
    assert kept == [3] and result.best_epoch == 3


def test_lexicographic_scores_break_ties() -> None:
    """(AUC, -loss): an equal AUC with a lower loss is better; a higher AUC wins whatever the loss."""
    scores = [None, (0.8, -0.5), (0.8, -0.4), (0.8, -0.45), (0.9, -0.9)]
    kept: list[int] = []
    _, _, step, batches = _setup()
    fit(step, batches, epochs=4, validate=lambda e: Validation({}, scores[e]), on_best=lambda e, v: kept.append(e))
    assert kept == [1, 2, 4]


# -- patience -------------------------------------------------------------------------------------------------


def test_patience_stops_after_epochs_without_a_kept_validation() -> None:
    advanced: list[int] = []
    result, calls, kept = _fit([None, 0.5, 0.6, 0.55, 0.55, 0.55, 0.9], 6, patience=2, progress=advanced.append)
    assert kept == [1, 2] and calls == [1, 2, 3, 4]
    assert result.stopped_early and result.epochs == 4 and len(result.history) == 4
    assert sum(advanced) == 6  # the progress bar is completed on an early stop


def test_patience_counts_validated_epochs_only_after_something_is_kept() -> None:
    result, _, _ = _fit([None] * 6, 5, patience=1)
    assert not result.stopped_early and result.epochs == 5
    # patience counts epochs, not validations: validating every 2 epochs, patience 3 stops at epoch 2 + 3
    result, calls, _ = _fit([None, 0.1, 0.5, 0.1, 0.1, 0.1, 0.1], 6, val_every=2, patience=3)
    assert calls == [2, 4] and result.stopped_early and result.epochs == 5


# -- AMP ------------------------------------------------------------------------------------------------------


def test_amp_is_off_on_cpu() -> None:
    assert resolve_amp("auto", True, "cpu") is False
    assert resolve_amp(True, False, "cpu") is False
    assert resolve_amp("auto", True, "cuda:0") is True and resolve_amp("auto", False, "cuda") is False
    assert resolve_amp(False, True, "cuda") is False and resolve_amp(True, False, "cuda") is True
    net = torch.nn.Linear(3, 2)
    step = SupervisedStep(net, torch.nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), lambda b: b,
                          device="cpu", amp=True)
    assert step.amp is False and not step.scaler.is_enabled()


def test_supervised_step_equals_a_plain_loop_exactly() -> None:
    """Same seed, same data order: fit + SupervisedStep gives the plain loop's losses and weights to the bit."""
    net, _, step, batches = _setup(seed=3)
    result = fit(step, batches, epochs=3, modules=[net])

    torch.manual_seed(3)
    ref = torch.nn.Linear(3, 2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _data()
    gen = torch.Generator().manual_seed(3)
    means = []
    for _ in range(3):
        perm = torch.randperm(len(x), generator=gen)
        losses = []
        for i in range(0, len(x), 8):
            idx = perm[i:i + 8]
            loss = torch.nn.functional.cross_entropy(ref(x[idx]), y[idx])
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            losses.append(float(loss.detach()))
        means.append(float(np.mean(losses)))
    assert [r["loss"] for r in result.history] == means
    assert torch.equal(net.weight, ref.weight) and torch.equal(net.bias, ref.bias)
    assert means[-1] < means[0]  # and it learns


# -- history rows ---------------------------------------------------------------------------------------------


def test_history_rows_hold_summary_lr_fixed_columns_and_time() -> None:
    net, opt, step, batches = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    logs: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(record.getMessage())

    log = logging.getLogger("test.fit.history")
    log.setLevel(logging.DEBUG)
    log.addHandler(Capture())
    result = fit(step, batches, epochs=3, modules=[net], optimizer=opt, scheduler=sched, fixed={"fold": 2},
                 validate=lambda e: Validation({"val_x": e * 10}, (float(e),), f"x {e}"), val_every=2,
                 val_columns=("val_x",), log=log, label="fold 2 ")
    rows = result.history
    assert [set(r) for r in rows] == [{"fold", "epoch", "loss", "val_x", "lr", "seconds"}] * 3
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.025, 0.0125])  # read after the epoch's step
    assert [r["val_x"] for r in rows] == [None, 20, 30] and all(r["fold"] == 2 for r in rows)
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in rows)
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
    assert len(logs) == 3 and logs[1].startswith("fold 2 epoch 2/3: loss ") and "x 2 (kept)" in logs[1]


def test_scheduler_per_iteration_and_custom_summary() -> None:
    _, opt, step, batches = _setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    fit(step, batches, epochs=2, scheduler=sched, scheduler_step="iteration")
    assert sched.last_epoch == 2 * len(batches) == 6
    rows = fit(lambda b: {"d_loss": 1 / 3, "g_loss": 2.0, "d_real": 0.123456789, "d_fake": -1.0}, [0, 1, 2],
               epochs=1, summarize=gan_summary).history
    assert rows[0]["d_loss"] == 0.33333 and rows[0]["d_real"] == 0.12346


def test_an_epoch_without_batches_and_a_diverged_loss_are_errors() -> None:
    _, _, step, _ = _setup()
    with pytest.raises(StageError, match="no training batch"):
        fit(step, [], epochs=1)
    with pytest.raises(StageError, match="diverged at epoch 1"):
        fit(lambda b: {"loss": math.nan}, [0], epochs=1, finite=("loss",))
    assert fit(lambda b: {"loss": math.inf}, [0], epochs=1).history[0]["loss"] == math.inf  # not checked unless asked


def test_shuffled_batches_reshuffle_every_epoch_and_drop_partial_batches() -> None:
    x = torch.arange(10)
    b = ShuffledBatches([x], 4, torch.Generator().manual_seed(0), drop_last=True)
    first, second = [t[0].tolist() for t in b], [t[0].tolist() for t in b]
    assert len(b) == 2 and [len(t) for t in first] == [4, 4] and first != second
    full = ShuffledBatches([x, x * 2], 4, torch.Generator().manual_seed(0), transform=lambda a, c: (a, c + 1))
    batches = list(full)
    assert len(full) == 3 and sorted(torch.cat([t[0] for t in batches]).tolist()) == list(range(10))
    assert all(torch.equal(c, a * 2 + 1) for a, c in batches)


# -- robust selection: min_epoch, a window of validations, averaged weights -------------------------------------


def test_min_epoch_keeps_nothing_earlier() -> None:
    result, _, kept = _fit([None, 0.9, 0.3, 0.5, 0.4], 4, min_epoch=3)
    assert kept == [3] and result.best_epoch == 3  # epoch 1's 0.9 (an early fluke) is not kept


def test_window_compares_the_mean_of_the_last_validations() -> None:
    scores = [None, 0.1, 0.9, 0.1, 0.5, 0.6, 0.6]
    _, _, kept = _fit(scores, 6)
    assert kept == [1, 2]  # one validation each: the spike at epoch 2 wins
    result, _, kept = _fit(scores, 6, window=3)
    assert kept == [3, 4, 6]  # means 0.367, 0.5, (0.4), 0.567; nothing before three validations
    assert result.best_epoch == 6


def _trajectory_fit(average: object, epochs: int = 3) -> tuple[list[torch.Tensor], list[int]]:
    """Train with ``average``; return the weights after every step and the number of steps per epoch."""
    net, opt, step, batches = _setup()
    average.__init__(net, average.kind, decay=average.decay, start_epoch=average.start_epoch)  # type: ignore[attr-defined,misc]
    seen: list[torch.Tensor] = []

    def iteration(batch: object) -> dict[str, float]:
        out = step(batch)
        seen.append(net.weight.detach().clone())
        return out

    fit(iteration, batches, epochs=epochs, average=average)
    return seen, [len(batches)] * epochs


def test_ema_is_the_exponential_average_of_the_weights_after_each_step() -> None:
    from medpipe.training.selection import WeightAverage

    avg = WeightAverage(torch.nn.Linear(3, 2), "ema", decay=0.7)
    seen, _ = _trajectory_fit(avg)
    expected = seen[0]
    for w in seen[1:]:
        expected = 0.7 * expected + 0.3 * w
    assert torch.allclose(avg.module.weight, expected, atol=1e-6) and avg.n_averaged == len(seen)


def test_swa_is_the_mean_of_the_epoch_ends_from_its_start() -> None:
    from medpipe.training.selection import WeightAverage

    avg = WeightAverage(torch.nn.Linear(3, 2), "swa", start_epoch=2)
    seen, per_epoch = _trajectory_fit(avg, epochs=4)
    ends = [seen[sum(per_epoch[:e]) - 1] for e in range(1, 5)]
    assert torch.allclose(avg.module.weight, torch.stack(ends[1:]).mean(0), atol=1e-6) and avg.n_averaged == 3


def test_averaged_batch_norm_statistics_are_recomputed_for_the_averaged_weights() -> None:
    from medpipe.training.selection import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    data = [torch.randn(8, 3) + 2 for _ in range(3)]
    avg = WeightAverage(net, "ema", decay=0.5, bn_batches=lambda: iter(data))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for x in data:
        net.train()
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
        avg.after_step()
    state = torch.get_rng_state()
    module = avg.prepare()
    assert torch.equal(state, torch.get_rng_state())  # draws no random numbers: training is unchanged
    with torch.no_grad():
        hidden = torch.cat([module[0](x) for x in data])
    assert torch.allclose(module[1].running_mean, hidden.mean(0), atol=1e-5)
    assert not torch.allclose(module[1].running_mean, net[1].running_mean, atol=1e-3)


def test_selection_options_are_checked_against_the_training_length() -> None:
    from pydantic import ValidationError

    from medpipe.stages.train_classifier import TrainClassifierParams
    from medpipe.stages.train_segmenter import TrainSegmenterParams

    with pytest.raises(ValidationError, match="min_epochs \\(9\\) is larger than epochs \\(5\\)"):
        TrainClassifierParams(epochs=5, min_epochs=9)
    with pytest.raises(ValidationError, match="select_window \\(4\\) is more than the 3 validation"):
        TrainSegmenterParams(epochs=10, val_every=4, select_window=4)
    with pytest.raises(ValidationError, match="swa_start is used with average: swa only"):
        TrainSegmenterParams(swa_start=3)
    with pytest.raises(ValidationError, match="needs norm: instance or group"):
        TrainSegmenterParams(average="ema", norm="batch")
    p = TrainSegmenterParams(epochs=40, average="swa")
    assert p.swa_start_epoch(40) == 31 and p.first_keepable_epoch(40) == 31
