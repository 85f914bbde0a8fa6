"""Robust model selection: what the training stages keep, and averaged weights (EMA / SWA).

A checkpoint chosen by one validation number on a small validation split is a lottery: on a fold
with one validation case, both medpipe and a plain script kept an over-segmenting epoch-10 model
(Dice 0.21 against 0.80 on the other folds). The options here (:class:`SelectionOptions`, shared by
``train_segmenter`` and ``train_classifier``) make the choice steadier:

* ``select_window: N``: keep-best compares the metric averaged over the last N validations (the
  weights kept are those of the newest of them; nothing is kept before N validations), so a single
  lucky validation does not win;
* ``min_epochs``: no checkpoint is kept before this epoch (early epochs can score well on a small
  split for the wrong reasons, e.g. predicting everything as foreground);
* ``average: ema``: an exponential moving average of the weights (``ema_decay`` per optimiser
  step) is what is validated and kept;
* ``average: swa``: stochastic weight averaging: from epoch ``swa_start`` on, the mean of the weights
  at the end of every epoch is what is validated and kept (before it, the current weights); no
  checkpoint is kept before ``swa_start``.

Selection by validation loss or simply the last epoch are options of each stage's ``select``.
:class:`WeightAverage` implements both averages on plain tensors (floating-point parameters and
buffers averaged, integer buffers such as batch-norm counters copied) and is saved in the training
snapshot (``state_dict``), so ``--resume`` continues the average exactly.

**Batch norm.** Averaged weights do not fit the running statistics the training weights collected (a
ResNet's EMA scored validation AUC 0.72 where its training weights scored 0.86 on BreastMNIST). So
when the network has batch-norm layers, :meth:`WeightAverage.prepare` recomputes their statistics
for the averaged weights (one forward pass over the training images without augmentation, cumulative
averages, as ``torch.optim.swa_utils.update_bn`` does) before the averaged model is validated or
saved; the pass draws no random numbers, so it does not change the training that follows. In distributed
training each rank passes its own share of the images and the statistics are averaged over all ranks'
batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Average = Literal["none", "ema", "swa"]

#: fewer validation cases than this and a checkpoint chosen on them is warned about
FEW_VALIDATION_CASES = 5


class SelectionOptions(BaseModel):
    """The selection parameters both training stages take (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    select_window: int = Field(1, ge=1, le=100, description="compare the selection metric averaged over the last N "
                                                            "validations (1: each validation alone)")
    min_epochs: int = Field(0, ge=0, le=100_000, description="no checkpoint is kept before this epoch")
    average: Average = Field("none", description="validate and keep an average of the weights: ema (exponential "
                                                 "moving average per step) or swa (mean of epoch ends from swa_start)")
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0, description="average: ema: decay per optimiser step")
    swa_start: int | None = Field(None, ge=1, le=100_000, description="average: swa: first epoch averaged; None: the "
                                                                     "last quarter of the epochs")

    @model_validator(mode="after")
    def _check_selection(self) -> SelectionOptions:
        epochs = getattr(self, "epochs", None)
        val_every = getattr(self, "val_every", None)
        if isinstance(epochs, int) and isinstance(val_every, int):
            validations = epochs // val_every + (1 if epochs % val_every else 0)
            if self.select_window > validations:
                raise ValueError(f"select_window ({self.select_window}) is more than the {validations} validation(s) "
                                 f"of {epochs} epochs validated every {val_every}")
        if isinstance(epochs, int):
            if self.min_epochs > epochs:
                raise ValueError(f"min_epochs ({self.min_epochs}) is larger than epochs ({epochs})")
            if self.swa_start is not None and self.swa_start > epochs:
                raise ValueError(f"swa_start ({self.swa_start}) is larger than epochs ({epochs})")
        if self.swa_start is not None and self.average != "swa":
            raise ValueError("swa_start is used with average: swa only")
        return self

    def first_keepable_epoch(self, epochs: int) -> int:
        """The first epoch whose validation may be kept (``min_epochs``, and ``swa_start`` under SWA)."""
        first = self.min_epochs
        if self.average == "swa":
            first = max(first, self.swa_start_epoch(epochs))
        return first

    def swa_start_epoch(self, epochs: int) -> int:
        return self.swa_start if self.swa_start is not None else max(1, epochs - epochs // 4 + 1)

    def weight_average(self, net: Any, epochs: int, bn_batches: Callable[[], Iterable[Any]] | None = None,
                       dist: Any = None) -> WeightAverage | None:
        """The :class:`WeightAverage` these options ask for (None: plain weights); ``bn_batches()``: the training
        inputs without augmentation, for networks with batch norm (:meth:`WeightAverage.prepare`; distributed:
        this rank's share of them, ``dist``)."""
        if self.average == "none":
            return None
        return WeightAverage(net, self.average, decay=self.ema_decay, start_epoch=self.swa_start_epoch(epochs),
                             bn_batches=bn_batches, dist=dist)


class WeightAverage:
    """An averaged copy of ``net`` (``module``), updated by :func:`medpipe.training.loop.fit`.

    ``ema``: after every optimiser step, ``avg = decay * avg + (1 - decay) * w`` (the first step copies).
    ``swa``: at the end of every epoch from ``start_epoch`` on, the running mean of the weights; before
    ``start_epoch``, ``module`` follows the current weights (so a validation then scores the real model).
    """

    def __init__(self, net: Any, kind: Literal["ema", "swa"], *, decay: float = 0.99, start_epoch: int = 1,
                 bn_batches: Callable[[], Iterable[Any]] | None = None, dist: Any = None) -> None:
        self.net = net
        self.dist = dist if dist is not None and dist.enabled else None
        self.kind = kind
        self.decay = float(decay)
        self.start_epoch = int(start_epoch)
        self.module = copy.deepcopy(net)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.n_averaged = 0
        self.bn_batches = bn_batches
        self._stale = True

    def _pairs(self) -> list[tuple[Any, Any]]:
        own = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*self.net.parameters(), *self.net.buffers()]
        return list(zip(own, theirs, strict=True))

    def _copy(self) -> None:
        import torch

        with torch.no_grad():
            for a, w in self._pairs():
                a.copy_(w.detach())

    def _blend(self, weight_new: float) -> None:
        import torch

        with torch.no_grad():
            for a, w in self._pairs():
                if a.is_floating_point():
                    a.lerp_(w.detach().to(a.dtype), weight_new)
                else:
                    a.copy_(w.detach())

    def _norms(self) -> list[Any]:
        import torch

        return [m for m in self.module.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def prepare(self) -> Any:
        """The averaged module, ready for validation or saving (batch-norm statistics recomputed for its weights
        when the network has batch norm and ``bn_batches`` was given); returns ``module``."""
        norms = self._norms()
        if not self._stale or not norms or self.bn_batches is None:
            return self.module
        import torch

        momenta = [m.momentum for m in norms]
        self.module.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
            m.train()
        device = next(self.module.parameters()).device
        with torch.no_grad():
            for x in self.bn_batches():
                self.module(x.to(device))
            if self.dist is not None:  # each rank passed its own shard: the mean over all batches of all ranks
                for m in norms:
                    count = m.num_batches_tracked.to(m.running_mean.dtype)
                    total = count.clone()
                    sums = [m.running_mean.mul_(count), m.running_var.mul_(count), total]
                    self.dist.all_reduce_sum(sums)
                    m.running_mean.div_(total.clamp_min(1))
                    m.running_var.div_(total.clamp_min(1))
                    m.num_batches_tracked.copy_(total.to(m.num_batches_tracked.dtype))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        self.module.eval()
        self._stale = False
        return self.module

    def after_step(self) -> None:
        """Called after every optimiser step (EMA)."""
        if self.kind != "ema":
            return
        self._stale = True
        if self.n_averaged == 0:
            self._copy()
        else:
            self._blend(1.0 - self.decay)
        self.n_averaged += 1

    def after_epoch(self, epoch: int) -> None:
        """Called at the end of every epoch, before its validation (SWA)."""
        if self.kind != "swa":
            return
        self._stale = True
        if epoch < self.start_epoch:
            self._copy()
            return
        if self.n_averaged == 0:
            self._copy()
        else:
            self._blend(1.0 / (self.n_averaged + 1))
        self.n_averaged += 1

    def wrap(self, validate: Callable[[int], Any]) -> Callable[[int], Any]:
        """``validate`` run on the prepared averaged module (:meth:`prepare` first)."""

        def run(epoch: int) -> Any:
            self.prepare()
            return validate(epoch)

        return run

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {"module": self.module.state_dict(), "n_averaged": torch.tensor(self.n_averaged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.n_averaged = int(state["n_averaged"])
        self._stale = True


def window_mean(scores: list[tuple[float, ...]]) -> tuple[float, ...]:
    """Element-wise mean of score tuples (keep-best over the last N validations)."""
    n = len(scores)
    return tuple(sum(s[i] for s in scores) / n for i in range(len(scores[0])))
