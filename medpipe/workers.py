"""Worker processes: as many as the work and the CPUs allow, and never outliving the process that started them."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def pool_size(workers: int, jobs: int) -> int:
    """Worker processes for ``jobs`` pieces of work: never more than the work or the CPUs."""
    return max(1, min(workers, jobs, available_cpus()))


def die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the process that started it dies (even by kill -9)."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: the kernel kills us with the parent
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watcher below still works
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:  # everywhere else (and as a fallback): notice the parent is gone, and go
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="medpipe-parent-watch", daemon=True).start()


def _init(parent: int, initializer: Callable[..., None] | None, args: tuple[Any, ...]) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*args)


def process_pool(workers: int, jobs: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = ()) -> Executor | None:
    """A process pool of :func:`pool_size` workers that die with this process; None when one is enough."""
    size = pool_size(workers, jobs)
    if size <= 1:
        return None
    ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    return ProcessPoolExecutor(max_workers=size, mp_context=ctx, initializer=_init,
                               initargs=(os.getpid(), initializer, initargs))
