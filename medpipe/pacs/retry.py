"""Retries with exponential back-off for transient PACS failures (connection refused or lost, timeouts, busy)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from medpipe.errors import PacsError

log = logging.getLogger("medpipe.pacs")
T = TypeVar("T")


def backoff(attempt: int, first: float, cap: float = 60.0) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): ``first``, 2 x ``first``, 4 x ... at most ``cap``."""
    return min(cap, first * (2 ** max(0, attempt - 1)))


def with_retries(fn: Callable[[], T], *, retries: int, first_delay: float, what: str,
                 progressed: Callable[[], bool] | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``; on a transient :class:`PacsError` wait and call it again, ``retries`` times at most.

    ``progressed``: asked after each failure; when it says the failed attempt still moved things forward
    (instances arrived), the count starts again, so a long pull over a flaky link is not given up on.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except PacsError as exc:
            if not exc.transient:
                raise
            if progressed is not None and progressed():
                attempt = 0
            attempt += 1
            if attempt > retries:
                raise
            delay = backoff(attempt, first_delay)
            log.warning("%s: %s; retry %d of %d in %.1f s", what, exc, attempt, retries, delay)
            sleep(delay)
