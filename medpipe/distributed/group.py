"""One process of a distributed (DDP) run: who it is, the collectives it uses, and how the ranks coordinate.

:class:`Distributed` describes the process: ``rank``, ``world_size``, ``local_rank``, the backend (gloo on
CPU, NCCL on CUDA) and ``device``. :data:`SINGLE` is the one-process run: every collective is then the
identity, so library code calls them unconditionally.

**Collectives** (``torch.distributed``, on the default group, with the collective timeout
``MEDPIPE_DDP_TIMEOUT``, default 600 s): :meth:`~Distributed.broadcast`, :meth:`~Distributed.all_gather`,
:meth:`~Distributed.sync_buffers` (a module's buffers from rank 0). They are for training, where the
ranks meet every few seconds.

**Coordination** (the launcher's key-value store, :class:`torch.distributed.TCPStore`, no timeout): the
pipeline's other stages run on rank 0 alone while the other ranks wait, possibly for hours (an ingest of
50,000 studies), which no collective timeout should bound. So rank 0 :meth:`~Distributed.publish`\\ es what
comes next and the others :meth:`~Distributed.wait` for it, polling the store; they stop waiting when

* a rank has reported a failure (:meth:`~Distributed.report_failure`: the first one to report is the
  *origin*; its one-line message is what the job ends with, the others stop quietly), or
* rank 0's heartbeat (a thread bumping a counter every :data:`HEARTBEAT_SECONDS`) has not moved for the
  collective timeout: rank 0 is stuck or gone.

A rank that fails writes its line (:func:`write_error_files`) for ``torchrun``'s summary
(``TORCHELASTIC_ERROR_FILE``) and for medpipe's own launcher (``MEDPIPE_DDP_ERRORS``, see
:mod:`medpipe.distributed.launch`), which ends the job with that line. A rank that dies without a word
(killed, a segfault) closes its connections: the others' collectives fail at once (gloo), and torchrun's
agent stops the remaining processes of the job.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError

#: seconds a collective may wait for the other ranks (and rank 0's heartbeat may stand still)
TIMEOUT_ENV = "MEDPIPE_DDP_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
#: where medpipe's launcher collects the failing rank's one-line error
ERRORS_ENV = "MEDPIPE_DDP_ERRORS"
HEARTBEAT_SECONDS = 2.0
POLL_SECONDS = 0.05


class PeerFailed(MedpipeError):
    """Another rank failed first (its message is the job's error); this rank stops without a message of its own."""


@dataclass(eq=False)  # compared and hashed by identity: one per process
class Distributed:
    """This process's place in a run (see the module docstring); :data:`SINGLE` when there is one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"
    timeout: float = DEFAULT_TIMEOUT
    store: Any = field(default=None, repr=False)
    _beat: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        """A seed of this rank's own (random augmentation and sampling differ between ranks); ``seed`` itself on
        rank 0 and in a one-process run."""
        return seed + 7919 * self.rank

    # -- collectives -------------------------------------------------------------------------------------

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, module: Any) -> None:
        """Rank 0's buffers on every rank (e.g. batch-norm running statistics, which each rank updates from its
        own batches). Parameters are left alone: DDP keeps them identical, and :func:`check_identical
        <medpipe.training.ddp.check_identical>` would not see a divergence that a copy had hidden."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for t in module.buffers():
                dist.broadcast(t.data, src=0)

    def all_reduce_sum(self, tensors: Iterable[Any]) -> None:
        """Sum each tensor over the ranks, in place."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    # -- coordination through the store ---------------------------------------------------------------

    def publish(self, key: str, doc: Any) -> None:
        """Rank 0 tells the others ``doc`` (JSON) under ``key``."""
        if self.enabled:
            self.store.set(key, json.dumps(doc, default=str))

    def wait(self, key: str) -> Any:
        """The ``doc`` published under ``key``, once it is there (see the module docstring for when waiting stops).

        Raises:
            PeerFailed: another rank failed.
            MedpipeError: rank 0's heartbeat stood still for the timeout.
        """
        beat, since = self._heartbeat(), time.monotonic()
        while True:
            self.raise_if_failed()
            if self.store.check([key]):
                return json.loads(self.store.get(key).decode())
            now = self._heartbeat()
            if now != beat:
                beat, since = now, time.monotonic()
            elif time.monotonic() - since > self.timeout:
                raise MedpipeError(f"rank {self.rank}: rank 0 has not answered for {self.timeout:.0f} s",
                                   hint=f"raise {TIMEOUT_ENV} (seconds) if rank 0 is busy, else look at its log")
            time.sleep(POLL_SECONDS)

    def arrive(self, key: str) -> None:
        """Count this rank in at ``key`` (see :meth:`wait_arrivals`)."""
        if self.enabled:
            self.store.add(key, 1)

    def wait_arrivals(self, key: str, n: int) -> None:
        """Wait until ``n`` ranks have :meth:`arrive`\\ d at ``key`` (within the timeout).

        Raises:
            PeerFailed: another rank failed.
        """
        start = time.monotonic()
        while self.store.add(key, 0) < n:
            self.raise_if_failed()
            if time.monotonic() - start > self.timeout:
                raise MedpipeError(f"the other ranks did not finish {key} within {self.timeout:.0f} s",
                                   hint=f"raise {TIMEOUT_ENV} (seconds), or look at their output")
            time.sleep(POLL_SECONDS)

    def report_failure(self, message: str) -> bool:
        """Record this rank's failure; True when it is the first of the job (the origin, whose message counts)."""
        if not self.enabled or self.store is None:
            return True
        try:
            first = int(self.store.add("failures", 1)) == 1
            if first:
                self.store.set("failure", f"rank {self.rank}: {message}")
        except Exception:  # noqa: BLE001 - the store is gone with rank 0's node: speak for ourselves
            return True
        return first

    def failure(self) -> str | None:
        """The origin's ``rank R: message`` once a rank has failed, else None."""
        if not self.enabled or self.store is None:
            return None
        try:
            return self.store.get("failure").decode() if self.store.check(["failure"]) else None
        except Exception:  # noqa: BLE001 - the store is unreachable: nobody could have reported there
            return None

    def raise_if_failed(self) -> None:
        failed = self.failure()
        if failed is not None:
            raise PeerFailed(f"stopped: {failed}")

    def _heartbeat(self) -> int:
        return int(self.store.add("heartbeat", 0))

    def start_heartbeat(self) -> None:
        """Rank 0: bump the heartbeat every :data:`HEARTBEAT_SECONDS` until :meth:`close`."""
        if not (self.enabled and self.is_main) or self._beat is not None:
            return
        stop = threading.Event()
        store = self.store.clone() if hasattr(self.store, "clone") else self.store

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    store.add("heartbeat", 1)
                except Exception:  # noqa: BLE001 - the store went away: the job is ending
                    return

        thread = threading.Thread(target=beat, name="medpipe-heartbeat", daemon=True)
        thread.start()
        self._beat = stop

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        if self._beat is not None:
            self._beat.set()
            self._beat = None
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Distributed()


def launched() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` when this process was started by torchrun (or medpipe's launcher) as one
    of several; None for a plain process (or a world of one)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise MedpipeError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise MedpipeError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world})")
    return rank, world, local


def join(use_cuda: bool) -> Distributed:
    """Join the process group torchrun set up this process for: NCCL and ``cuda:LOCAL_RANK`` when ``use_cuda``,
    else gloo on the CPU. Returns :data:`SINGLE` outside a multi-process launch.

    Raises:
        MedpipeError: the rendezvous failed (the message says why) or the environment is inconsistent.
    """
    where = launched()
    if where is None:
        return SINGLE
    import torch
    import torch.distributed as dist

    rank, world, local = where
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise MedpipeError(f"{TIMEOUT_ENV} must be a number of seconds") from None
    backend, device = "gloo", "cpu"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise MedpipeError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s)",
                               hint="start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        backend, device = "nccl", f"cuda:{local}"
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        client = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout),
                               wait_for_workers=False)
    except (RuntimeError, ValueError, OSError) as exc:
        raise MedpipeError(f"rank {rank}: cannot join the other {world - 1} process(es) at {addr}:{port} "
                           f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                           ) from None
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'medpipe')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = dist.PrefixStore(f"medpipe/{run}/", client)
    d = Distributed(rank, world, local, backend, device, timeout, store)
    d.start_heartbeat()
    return d


def write_error_files(d: Distributed, message: str, hint: str | None = None, *, interrupted: bool = False) -> None:
    """This rank's failure as one line: ``torchrun``'s error file (its summary names the root cause) and, under
    medpipe's launcher, ``$MEDPIPE_DDP_ERRORS/rank<R>.json``."""
    stamp = time.time()
    torchrun_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if torchrun_file:
        doc = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                             "timestamp": str(int(stamp))}}}
        _write_json(Path(torchrun_file), doc)
    folder = os.environ.get(ERRORS_ENV)
    if folder:
        _write_json(Path(folder) / f"rank{d.rank}.json", {"rank": d.rank, "message": message, "hint": hint,
                                                          "interrupted": interrupted, "time": stamp})


def _write_json(path: Path, doc: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except OSError:  # reporting must never hide the error itself
        pass
