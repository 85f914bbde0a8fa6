"""The one training loop: :func:`fit` runs epochs of an iteration function and does everything around it.

Every model medpipe trains (segmenter, classifier and its k-fold members, the GAN and the GAN's
feature extractor) goes through :func:`fit`. What differs between them is one *iteration function*
(``batch -> {name: float}``: :class:`SupervisedStep` for the networks trained with a loss on labels,
:class:`medpipe.training.gan.GanStep` for the GAN) and one *validation function*
(``epoch -> Validation``). What they share is implemented here once:

* train mode at the start of every epoch, the per-epoch summary of the iteration logs (mean by
  default) and a refusal of epochs without a batch;
* the learning-rate schedule, stepped per epoch (or per iteration: ``scheduler_step="iteration"``),
  and the learning rate in the history;
* validation every ``val_every`` epochs and after the last one (optionally also before the first:
  ``validate_first``, epoch 0);
* keep-best: a validation is kept when its ``score`` tuple is larger than the kept one's
  (lexicographic, so later entries break ties; ``floor`` is the score to beat at first); ``on_best``
  then writes the checkpoint; optionally the score compared is the mean over the last ``window``
  validations, and no validation before ``min_epoch`` is kept (:mod:`medpipe.training.selection`);
* averaged weights (``average``: an EMA updated after every step, or SWA at every epoch end), which
  the validation function then scores;
* early stopping after ``patience`` epochs without a kept validation;
* non-finite losses named in ``finite`` stop the run with a :class:`~medpipe.errors.StageError`;
* history rows (``epoch``, the summary, the validation columns, ``lr``, ``seconds``, plus fixed
  columns such as ``fold``), a progress callback advanced once per epoch, and one log line per epoch
  (INFO on validation epochs, DEBUG otherwise);
* distributed training (``dist``, one rank of a DistributedDataParallel run, :mod:`medpipe.training.ddp`):
  ``epoch_start(epoch)`` before every epoch (the sampler's ``set_epoch``), and the epoch summary made from
  every rank's iteration logs, so every rank sees the same history and takes the same decisions (the
  validation function gathers its own shards; the snapshot saves on rank 0).

Mixed precision lives in :class:`SupervisedStep` (``torch.autocast`` + ``GradScaler``, on CUDA only:
:func:`resolve_amp`).

**Why not MONAI's engines.** ``monai.engines.SupervisedTrainer`` / ``GanTrainer`` with
``ValidationHandler``, ``CheckpointSaver`` and ``EarlyStopHandler`` have this shape, and this module
copies it (one iteration function per model kind, behaviours written once); the engines themselves
were not used:

1. They need PyTorch-Ignite, which is not a medpipe dependency (nor in its environment): a new
   dependency for a loop of about 150 lines.
2. Exact reproducibility: the histories of the three trainers had to stay identical to the
   hand-written loops this replaced (same random number consumption, same losses to the last digit;
   checked on 13 configurations and the full ``brain_tumor`` pipeline). ``GanTrainer`` by default draws
   its latent vectors from the global random state (``default_make_latent``), sizes them by the
   loader's batch size, runs the generator with gradients once before the discriminator steps and
   hands its loss functions images only (no classes); medpipe's GAN is class-conditional (projection
   discriminator), draws everything from its own ``torch.Generator`` and updates a moving average
   after every step. Bending the engine to that takes more code than this loop.
3. Overhead (``benchmarks/overhead.py``, target at most 1.05x a plain ~30-line MONAI loop): on the
   BreastMNIST classifier, 5 interleaved repetitions of 3 epochs on a shared 2-core CPU, this loop
   took 1.04x the plain loop's median time (0.99x of its fastest run) and ``SupervisedTrainer`` with
   those handlers 1.04x (1.08x); on the brain tumour U-Net this loop took 1.004x. The engine is not
   much slower, but it is no faster, and its ~10 events and a decollation per iteration only add to
   it; this loop adds one dictionary and one ``float()`` per iteration.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from medpipe.errors import StageError

Logs = dict[str, float]
IterationFn = Callable[[Any], Logs]


@dataclass
class Validation:
    """What a validation function returns for one epoch.

    ``row``: columns for the history row (e.g. ``{"val_dice": 0.91}``); ``score``: the keep-best key
    (larger is better; lexicographic; None: never kept); ``summary``: text for the log line;
    ``values``: anything the caller wants back from the kept epoch (raw metrics, probabilities).
    """

    row: dict[str, Any]
    score: tuple[float, ...] | None = None
    summary: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best: Validation | None  # the kept validation (None: nothing kept)
    best_epoch: int  # 0: nothing kept
    epochs: int  # epochs run
    stopped_early: bool
    seconds: float


def mean_summary(logs: Sequence[Logs]) -> dict[str, float]:
    """Per key, the mean over the epoch's iterations (``numpy.mean``)."""
    import numpy as np

    return {k: float(np.mean([entry[k] for entry in logs])) for k in logs[0]}


def resolve_amp(amp: bool | Literal["auto"], auto: bool, device: str) -> bool:
    """Mixed precision for a ``amp`` parameter: ``auto`` follows the run (``auto``); True only on CUDA."""
    if amp == "auto":
        return bool(auto) and device.startswith("cuda")
    return bool(amp) and device.startswith("cuda")


def fit(
    iteration: IterationFn,
    batches: Iterable[Any],
    *,
    epochs: int,
    modules: Sequence[Any] = (),
    optimizer: Any = None,
    scheduler: Any = None,
    scheduler_step: Literal["epoch", "iteration"] = "epoch",
    validate: Callable[[int], Validation] | None = None,
    val_every: int = 1,
    validate_first: bool = False,
    val_columns: Sequence[str] = (),
    floor: tuple[float, ...] | None = None,
    on_best: Callable[[int, Validation], None] | None = None,
    patience: int | None = None,
    summarize: Callable[[Sequence[Logs]], dict[str, Any]] = mean_summary,
    summary_columns: Sequence[str] = (),
    finite: Sequence[str] = (),
    fixed: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    log: logging.Logger | None = None,
    label: str = "",
    snapshot: Any = None,
    window: int = 1,
    min_epoch: int = 0,
    average: Any = None,
    epoch_start: Callable[[int], None] | None = None,
    dist: Any = None,
) -> FitResult:
    """Train for ``epochs`` epochs of ``iteration`` over ``batches`` (re-iterated every epoch).

    Args:
        iteration: one training step: ``batch -> {name: float}`` (e.g. :class:`SupervisedStep`).
        batches: a ``DataLoader`` or any iterable that yields the epoch's batches when iterated.
        modules: put in train mode at the start of every epoch.
        optimizer: when given, its first group's learning rate goes into the history (``lr``).
        scheduler: stepped after every epoch (or iteration, ``scheduler_step``).
        validate: ``epoch -> Validation``, called every ``val_every`` epochs and after the last.
        validate_first: also validate before training (a history row for epoch 0).
        val_columns: the history columns a validation fills (None in the other rows).
        floor: the score a validation must beat to be kept first (None: any score).
        on_best: called with ``(epoch, validation)`` when a validation is kept (write the checkpoint).
        patience: stop after this many epochs without a kept validation (counted from the last kept).
        summarize: the epoch's iteration logs -> history columns (default: means).
        summary_columns: the columns ``summarize`` gives (None in the epoch-0 row of ``validate_first``).
        finite: summary columns that must be finite (else :class:`StageError`: the model diverged).
        fixed: columns added to every row (e.g. ``{"fold": 2}``).
        progress: advanced by 1 per epoch (and by the epochs left on an early stop); when it has a
            ``note(text)`` method it also gets the epoch's losses and validation metrics.
        log: one line per epoch: INFO on validation epochs, DEBUG otherwise; ``label`` prefixes it.
        snapshot: a :class:`medpipe.training.resume.Snapshot`: training continues from it when it holds a
            run made under the same key (after an interruption), and is saved as training goes.
        window: keep-best compares the mean score of the last ``window`` validations (those with a score); nothing
            is kept before ``window`` validations have a score.
        min_epoch: validations of earlier epochs are never kept.
        average: a :class:`medpipe.training.selection.WeightAverage` (its ``after_step`` is called after every
            iteration, ``after_epoch`` before the epoch's validation); put it in the snapshot's objects.
        epoch_start: called with the epoch number before every epoch (a distributed sampler's ``set_epoch``).
        dist: a :class:`medpipe.distributed.group.Distributed` of several ranks: the summary is made from every
            rank's iteration logs (in rank order). None: one process.

    Raises:
        StageError: an epoch without a batch, or a non-finite value in a ``finite`` column.
    """
    log = log or logging.getLogger("medpipe.training")
    fixed = dict(fixed or {})
    history: list[dict[str, Any]] = []
    best: Validation | None = None
    best_score = floor
    best_epoch, epoch, stopped_early = 0, 0, False
    t0 = time.perf_counter()
    start = 1
    recent: list[tuple[float, ...]] = []  # the scores of the last ``window`` validations
    resumed = snapshot.restore() if snapshot is not None else None
    if resumed is not None:
        history = resumed["history"]
        recent = [tuple(s) for s in resumed.get("recent", [])]
        if resumed["best"] is not None:
            kept_score = resumed["best"]["score"]
            best = Validation(**{**resumed["best"], "score": tuple(kept_score) if kept_score is not None else None})
        best_score = tuple(resumed["best_score"]) if resumed["best_score"] is not None else None
        best_epoch, epoch, stopped_early = resumed["best_epoch"], resumed["epoch"], resumed["stopped_early"]
        t0 -= resumed["seconds"]
        start = epoch + 1
        if progress is not None:
            progress(epoch)
        if resumed["finished"]:
            if progress is not None and epochs > epoch:
                progress(epochs - epoch)
            return FitResult(history, best, best_epoch, epoch, stopped_early, time.perf_counter() - t0)

    def save_snapshot(epoch: int, finished: bool) -> None:
        if snapshot is None:
            return
        kept = None if best is None else {"row": best.row, "score": best.score, "summary": best.summary,
                                           "values": best.values}
        snapshot.save({"epoch": epoch, "history": history, "best": kept, "best_score": best_score, "recent": recent,
                       "best_epoch": best_epoch, "stopped_early": stopped_early, "finished": finished,
                       "seconds": time.perf_counter() - t0}, force=finished)

    def validation(epoch: int, row: dict[str, Any]) -> str:
        nonlocal best, best_score, best_epoch
        from medpipe.training.selection import window_mean

        v = validate(epoch)  # type: ignore[misc]
        row.update(v.row)
        score = v.score
        if score is not None and window > 1:
            recent.append(tuple(score))
            del recent[:-window]
            score = window_mean(recent)
            v.summary += f" (mean of the last {len(recent)}: {score[0]:.4f})"
        full = window <= 1 or len(recent) >= window  # a partial window (the first validations) is never kept
        kept = score is not None and full and epoch >= min_epoch and (best_score is None or score > best_score)
        if score is not None and epoch < min_epoch:
            v.summary += f" (before min_epochs {min_epoch}: not kept)"
        if kept:
            best, best_score, best_epoch = v, score, epoch
            if on_best is not None:
                on_best(epoch, v)
        return f"{v.summary}{' (kept)' if kept else f' (kept: epoch {best_epoch})' if best_epoch else ''}"

    if validate is not None and validate_first and resumed is None:
        row0: dict[str, Any] = {**fixed, "epoch": 0, **dict.fromkeys(summary_columns), "seconds": 0.0}
        log.info("%sepoch 0 (before training): %s", label, validation(0, row0))
        history.append(row0)

    for epoch in range(start, epochs + 1):
        if epoch_start is not None:
            epoch_start(epoch)
        for m in modules:
            m.train()
        logs: list[Logs] = []
        for batch in batches:
            logs.append(iteration(batch))
            if average is not None:
                average.after_step()
            if scheduler is not None and scheduler_step == "iteration":
                scheduler.step()
        if scheduler is not None and scheduler_step == "epoch":
            scheduler.step()
        if average is not None:
            average.after_epoch(epoch)
        if dist is not None and dist.enabled:
            logs = [entry for rank_logs in dist.all_gather(logs) for entry in rank_logs]
        if not logs:
            raise StageError(f"{label}epoch {epoch} got no training batch; check the train split and transforms")
        summary = summarize(logs)
        bad = [k for k in finite if not math.isfinite(summary[k])]
        if bad:
            raise StageError(f"{label}training diverged at epoch {epoch} ({', '.join(bad)} not finite); lower the "
                             "learning rate")
        row: dict[str, Any] = {**fixed, "epoch": epoch, **summary, **dict.fromkeys(val_columns)}
        if optimizer is not None:
            row["lr"] = optimizer.param_groups[0]["lr"]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        if validate is not None and (epoch % val_every == 0 or epoch == epochs):
            log.info("%sepoch %d/%d: %s; %s", label, epoch, epochs, text, validation(epoch, row))
        else:
            log.debug("%sepoch %d/%d: %s", label, epoch, epochs, text)
        history.append(row)
        if progress is not None:
            progress(1)
            note = getattr(progress, "note", None)  # a bar that can show a status line (``medpipe run``'s)
            if note is not None:
                shown = {k: v for k, v in row.items() if k not in fixed and k not in ("epoch", "lr", "seconds")
                         and isinstance(v, float)}
                note(" ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        if patience is not None and best_epoch and epoch - best_epoch >= patience:
            stopped_early = True
            log.info("%searly stop at epoch %d: nothing better for %d epochs (kept: epoch %d)", label, epoch,
                     patience, best_epoch)
            if progress is not None:
                progress(epochs - epoch)
            break
        if epoch < epochs:
            save_snapshot(epoch, finished=False)
    save_snapshot(epoch, finished=True)
    return FitResult(history, best, best_epoch, epoch, stopped_early, time.perf_counter() - t0)


class SupervisedStep:
    """One supervised iteration: ``prepare(batch) -> (x, y)``, ``loss_fn(net(x).float(), y)``, backward, step.

    Mixed precision when ``amp`` (``torch.autocast`` to float16 + a ``GradScaler``), on CUDA only; the
    logits are cast to float32 before the loss. Returns ``{"loss": float}``.
    """

    def __init__(self, net: Any, loss_fn: Callable[[Any, Any], Any], optimizer: Any,
                 prepare: Callable[[Any], tuple[Any, Any]], *, device: str = "cpu", amp: bool = False) -> None:
        import torch

        self.net, self.loss_fn, self.optimizer, self.prepare = net, loss_fn, optimizer, prepare
        self.device, self.amp = device, bool(amp) and device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def __call__(self, batch: Any) -> Logs:
        from medpipe.inference.device import autocast

        x, y = self.prepare(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss = self.loss_fn(self.net(x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": float(loss.detach())}


class ShuffledBatches:
    """Batches of in-memory tensors, reshuffled at the start of every epoch by ``generator``.

    ``tensors``: equally long tensors indexed together; ``transform``: applied to each batch tuple
    (e.g. augmentation drawing from the same generator); ``drop_last``: only full batches (at least
    one). Distributed (``rank`` of ``world`` ranks, each with a ``generator`` in the same state): every
    rank draws the same permutation, cut into global batches of ``world * batch_size`` items, and takes
    every ``world``-th item of each (``batch_size`` per rank). Without ``drop_last`` the permutation is
    then extended by its own first items to whole global batches (as ``DistributedSampler`` pads), so
    every rank gets as many batches of as many items.
    """

    def __init__(self, tensors: Sequence[Any], batch_size: int, generator: Any, *, drop_last: bool = False,
                 transform: Callable[..., tuple[Any, ...]] | None = None, rank: int = 0, world: int = 1) -> None:
        self.tensors, self.batch_size, self.generator = list(tensors), int(batch_size), generator
        self.drop_last, self.transform = drop_last, transform
        self.rank, self.world = int(rank), int(world)
        self.n = len(self.tensors[0])

    def __len__(self) -> int:
        size = self.batch_size * self.world
        return max(1, self.n // size) if self.drop_last else math.ceil(self.n / size)

    def __iter__(self) -> Any:
        import torch

        size = self.batch_size * self.world
        perm = torch.randperm(self.n, generator=self.generator)
        if self.world > 1 and not self.drop_last:
            perm = perm.repeat(math.ceil(len(self) * size / self.n))[:len(self) * size]
        for b in range(len(self)):
            idx = perm[b * size:(b + 1) * size][self.rank::self.world]
            batch = tuple(t[idx] for t in self.tensors)
            yield self.transform(*batch) if self.transform is not None else batch
