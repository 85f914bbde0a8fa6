"""DistributedDataParallel for the training stages: the model, the training data, the validation shards.

A training stage run on N ranks (:attr:`medpipe.stage.RunContext.dist`) trains one model with
``torch.nn.parallel.DistributedDataParallel`` (gradients averaged over the ranks at every step, so every
rank holds the same weights) and reads its data as follows:

* **Training items.** With ``cache: memory`` each rank caches only its own shard of the items
  (``monai.data.partition_dataset``: a seeded shuffle dealt into N equal parts), so the cache costs the
  memory of one copy in all, not N copies (MONAI's ``CacheDataset`` in every DDP process holds the whole
  set); each rank then reshuffles its shard every epoch. With ``cache: none`` or ``disk`` every rank sees
  all items through a ``DistributedSampler``, reshuffled globally every epoch. Either way the order
  depends on the seed and the epoch only (``set_epoch``), so a resumed run reads what an uninterrupted one
  would. ``batch_size`` is per rank: N ranks train on N times the batch per step.
* **Validation** runs on every rank over its share of the cases (``items[rank::N]``); the per-case results
  are gathered (:func:`gather_shards`) and the metric is computed from all of them in the original order,
  so it is the number a single process computes (and the same on every rank, so keep-best and early
  stopping decide alike everywhere).
* Only rank 0 writes (checkpoints, history, plots, the model package); the stages check ``dist.is_main``.

In a one-process run (:data:`~medpipe.distributed.group.SINGLE`) none of this applies and the stages train
exactly as before (same data order, same random numbers, same results).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from medpipe.distributed.group import Distributed


def wrap(net: Any, dist: Distributed) -> Any:
    """The module to train: ``net`` in DistributedDataParallel on ``dist``'s device, or ``net`` itself in one
    process. Its parameters are ``net``'s (save and validate ``net``)."""
    if not dist.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    if dist.device.startswith("cuda"):
        return DistributedDataParallel(net, device_ids=[dist.local_rank], output_device=dist.local_rank)
    return DistributedDataParallel(net)


def cached_items(items: list[dict[str, Any]], cache: str, dist: Distributed, seed: int) -> list[dict[str, Any]]:
    """The training items this rank holds: its partition with ``cache: memory`` (see the module docstring),
    else all of them."""
    if not dist.enabled or cache != "memory":
        return items
    from monai.data import partition_dataset

    parts = partition_dataset(items, num_partitions=dist.world_size, shuffle=True, seed=seed, even_divisible=True)
    return list(parts[dist.rank])


def train_loader(ds: Any, *, batch_size: int, seed: int, dist: Distributed, partitioned: bool,
                 weights: Sequence[float] | None = None, drop_last: bool = False,
                 pin_memory: bool = False) -> tuple[Any, Callable[[int], None], Any]:
    """``(loader, set_epoch, sampler)`` for a rank of a distributed run: a ``DistributedSampler`` over all items
    (or, ``partitioned``, over this rank's own shard), or with ``weights`` a weighted sampler drawing with
    replacement (:class:`~medpipe.training.imbalance.EpochWeightedSampler`). Call ``set_epoch(epoch)`` before
    every epoch."""
    import torch
    from monai.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from medpipe.training.imbalance import EpochWeightedSampler

    replicas, rank = (1, 0) if partitioned else (dist.world_size, dist.rank)
    order_seed = dist.rank_seed(seed) if partitioned else seed  # a shard's own order; a global order shared
    sampler: Any
    if weights is not None:
        sampler = EpochWeightedSampler(weights, len(weights), num_replicas=replicas, rank=rank, seed=order_seed)
    else:
        sampler = DistributedSampler(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=order_seed,
                                     drop_last=False)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(dist.rank_seed(seed)), pin_memory=pin_memory)
    return loader, sampler.set_epoch, sampler


def shard(items: list[Any], dist: Distributed) -> list[Any]:
    """This rank's share of the validation items: ``items[rank::world_size]`` (all of them in one process)."""
    return items[dist.rank::dist.world_size] if dist.enabled else items


def gather_shards(local: list[Any], dist: Distributed) -> list[Any]:
    """Every rank's per-item results of :func:`shard`\\ ed items, back in the items' order (on every rank)."""
    if not dist.enabled:
        return local
    parts = dist.all_gather(local)
    out: list[Any] = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        for j, value in enumerate(part):
            out[r + j * dist.world_size] = value
    return out


def synced(validate: Callable[[int], Any], net: Any, dist: Distributed) -> Callable[[int], Any]:
    """``validate`` after rank 0's buffers (batch-norm running statistics, which each rank updates from its own
    batches) are copied to every rank: every rank validates, and rank 0 saves, the same model."""
    if not dist.enabled:
        return validate

    def run(epoch: int) -> Any:
        dist.sync_buffers(net)
        return validate(epoch)

    return run


def on_main(validate: Callable[[int], Any], dist: Distributed) -> Callable[[int], Any]:
    """``validate`` run on rank 0 alone, its result handed to every rank (e.g. a GAN's FID: one number that
    every rank would compute alike)."""
    if not dist.enabled:
        return validate

    def run(epoch: int) -> Any:
        return dist.broadcast(validate(epoch) if dist.is_main else None)

    return run


def weights_digest(net: Any) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        data = t.detach().cpu().contiguous()
        h.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical(nets: dict[str, Any], dist: Distributed, log: logging.Logger, label: str = "") -> None:
    """After training: every rank must hold the same weights (DDP's promise). Compared by digest; a difference
    is a bug in the distributed training and is raised, not logged."""
    if not dist.enabled:
        return
    for name, net in nets.items():
        digests = dist.all_gather(weights_digest(net))
        if len(set(digests)) != 1:
            raise RuntimeError(f"{label}the {name} weights differ between ranks after training: "
                               + ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(digests)))
        log.info("%s%s weights identical on all %d ranks (sha256 %s)", label, name, dist.world_size, digests[0][:16])
