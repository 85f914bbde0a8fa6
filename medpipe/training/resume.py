"""Training snapshots: after Ctrl-C (or a kill), ``medpipe run --resume`` continues training where it stopped.

A :class:`Snapshot` saves, at most every ``every_seconds`` and after the last epoch, everything the next
epoch depends on: the networks, optimisers, LR schedulers and gradient scalers (anything with
``state_dict`` / ``load_state_dict``), the random states (torch's and numpy's global ones, Python's,
the data loader's and sampler's ``torch.Generator``s and every random MONAI transform's own
``RandomState``) and the loop's own state (epoch, history, the kept validation). Restoring all of it
makes the continued run *identical* to an uninterrupted one (tested).

The snapshot carries a key (the runner's stage hash: parameters, seed, upstream stages): a snapshot
made under other settings is ignored, never resumed.

**Distributed training** (``dist`` of several ranks): the networks, optimisers and loop state are the same
on every rank, the random states are each rank's own. Rank 0 decides when to save (and tells the others),
gathers every rank's random states and writes one file; on resume rank 0 decides whether the file is
usable, and every rank then restores the shared state and its own random states, so the continued run is
the uninterrupted one. A snapshot made with another number of processes (or by a one-process run) is
resumed too, with the weights, optimiser and epoch; the ranks' random states then start afresh (a warning
says the continuation differs from an uninterrupted run, as the data shards do). It is written atomically next to the stage's
outputs as ``<name>.resume.pt`` and read with ``torch.load(weights_only=True)`` (tensors and plain
containers only: nothing is unpickled); the runner deletes it once the stage has finished.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("medpipe.training")

SNAPSHOT_FORMAT = "medpipe-training-snapshot"


def _random_transforms(transforms: Sequence[Any]) -> list[Any]:
    """Every object with a numpy ``RandomState`` ``R`` inside (MONAI ``Randomizable``): Compose trees and the
    transforms held in attributes walked, in a fixed order."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(t: Any) -> None:
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        if isinstance(getattr(t, "R", None), np.random.RandomState):
            out.append(t)
        for child in getattr(t, "transforms", None) or []:
            walk(child)
        # a dictionary transform keeps its array transform(s) in attributes (RandCropByPosNegLabeld.cropper,
        # RandScaleIntensityd.scaler, ...), each with a RandomState of its own
        for value in vars(t).values() if hasattr(t, "__dict__") else ():
            if hasattr(value, "R") or hasattr(value, "transforms") or hasattr(value, "set_random_state"):
                walk(value)

    for t in transforms:
        walk(t)
    return out


def _np_state(state: tuple[Any, ...]) -> dict[str, Any]:
    """A numpy RandomState state as tensors and numbers (``weights_only``-loadable)."""
    import torch

    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_restore(doc: dict[str, Any]) -> tuple[Any, ...]:
    return (doc["name"], doc["keys"].numpy().astype(np.uint32), doc["pos"], doc["has_gauss"], doc["cached"])


def _plain(value: Any) -> Any:
    """Loop state with numpy arrays / scalars as tensors / numbers (``weights_only``-loadable)."""
    import torch

    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return value["__ndarray__"].numpy()
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


class Snapshot:
    """Save and restore a training run's complete state (see the module docstring).

    Args:
        path: the snapshot file (``<stage dir>/<name>.resume.pt``).
        key: what the snapshot must have been made under to be resumed (the stage hash); empty: never resume.
        objects: name -> object with ``state_dict()`` / ``load_state_dict()`` (networks, optimisers, ...).
        generators: ``torch.Generator``s that draw the data order / augmentation.
        transforms: MONAI transforms (e.g. a dataset's ``Compose``) whose random transforms' states to keep.
        every_seconds: the least time between two snapshots (saving costs I/O; the last epoch is always saved).
    """

    def __init__(self, path: Path, key: str, *, objects: Mapping[str, Any], generators: Sequence[Any] = (),
                 transforms: Sequence[Any] = (), every_seconds: float = 30.0, dist: Any = None) -> None:
        self.path, self.key = Path(path), key
        self.objects = dict(objects)
        self.generators = [g for g in generators if g is not None]
        self.randoms = _random_transforms(transforms)
        self.every_seconds = every_seconds
        self.dist = dist if dist is not None and dist.enabled else None
        self._last = time.monotonic()

    def _readable(self) -> dict[str, Any] | None:
        """The snapshot's contents when it can be resumed here, else None (saying why)."""
        import torch

        if not self.key or not self.path.is_file():
            return None
        try:
            doc = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged snapshot is only lost progress: start again
            log.warning("training snapshot %s cannot be read (%s): training starts from epoch 1", self.path, exc)
            return None
        if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT or doc.get("key") != self.key:
            log.info("training snapshot %s was made with other settings: not resumed", self.path)
            return None
        if set(doc["objects"]) != set(self.objects) or len(doc["generators"]) != len(self.generators) or \
                len(doc["transforms"]) != len(self.randoms):
            log.warning("training snapshot %s does not fit this training run: not resumed", self.path)
            return None
        return doc  # type: ignore[no-any-return]

    def restore(self) -> dict[str, Any] | None:
        """Restore everything from the snapshot and return the loop state; None when there is nothing to resume."""
        import torch

        if self.dist is None:
            doc = self._readable()
        else:  # rank 0 decides; every rank then reads the file itself
            usable = self.dist.broadcast(self._readable() is not None if self.dist.is_main else None)
            doc = torch.load(self.path, map_location="cpu", weights_only=True) if usable else None
        if doc is None:
            return None
        for name, obj in self.objects.items():
            obj.load_state_dict(doc["objects"][name])
        randoms = doc
        if self.dist is not None:
            ranks = doc.get("ranks") or []
            if len(ranks) == self.dist.world_size:
                randoms = ranks[self.dist.rank]
            else:
                randoms = None
                if self.dist.is_main:
                    log.warning("training snapshot %s was made by %s; this run has %d: training continues from its "
                                "weights and epoch, but its data order and augmentation differ from an uninterrupted "
                                "run's", self.path.name, f"{len(ranks)} processes" if ranks else "one process",
                                self.dist.world_size)
        elif doc.get("ranks"):
            randoms = doc["ranks"][0]  # a distributed run's snapshot: rank 0's random states
        if randoms is not None:
            self._set_random_states(randoms)
        loop: dict[str, Any] = _unplain(doc["loop"])
        log.info("resuming training from its snapshot after epoch %d (%s)", loop["epoch"], self.path.name)
        return loop

    def _random_states(self) -> dict[str, Any]:
        import torch

        py = random.getstate()
        return {"generators": [g.get_state() for g in self.generators],
                "transforms": [_np_state(t.R.get_state()) for t in self.randoms],
                "torch": torch.get_rng_state(), "numpy": _np_state(np.random.get_state()),
                "python": [py[0], list(py[1]), py[2]]}

    def _set_random_states(self, doc: Mapping[str, Any]) -> None:
        import torch

        for gen, state in zip(self.generators, doc["generators"], strict=True):
            gen.set_state(state)
        for t, state in zip(self.randoms, doc["transforms"], strict=True):
            t.R.set_state(_np_restore(state))
        torch.set_rng_state(doc["torch"])
        np.random.set_state(_np_restore(doc["numpy"]))
        random.setstate((doc["python"][0], tuple(doc["python"][1]), doc["python"][2]))

    def save(self, loop: Mapping[str, Any], *, force: bool = False) -> bool:
        """Write a snapshot when ``every_seconds`` have passed since the last (or ``force``); return whether.

        Distributed: every rank calls it at the same points; rank 0's clock decides for all."""
        from medpipe.inference.checkpoint import save_checkpoint

        due = bool(self.key) and (force or time.monotonic() - self._last >= self.every_seconds)
        if self.dist is not None:
            due = bool(self.dist.broadcast(due if self.dist.is_main else None))
        if not due:
            return False
        randoms = self._random_states()
        doc: dict[str, Any] = {
            "format": SNAPSHOT_FORMAT, "key": self.key,
            "objects": {name: obj.state_dict() for name, obj in self.objects.items()},
            **randoms,
            "loop": _plain(dict(loop)),
        }
        if self.dist is not None:
            doc["ranks"] = self.dist.all_gather(randoms)
        if self.dist is None or self.dist.is_main:
            save_checkpoint(self.path, doc)
        self._last = time.monotonic()
        return True
