"""Distributed runs: one process per GPU (or CPU share), started by torchrun or by ``medpipe run --nproc N``.

* :mod:`~medpipe.distributed.group`: this process's place in the run (:class:`Distributed`, :data:`SINGLE` for a
  one-process run), the collectives training uses, and the coordination of the ranks through the launcher's
  store (rank 0 runs the non-training stages while the others wait; the first failure ends the job).
* :mod:`~medpipe.distributed.launch`: ``--nproc N``, N processes on this machine through torch's elastic agent.

A foundation module: torch is imported inside the functions that need it.
"""

from __future__ import annotations

from medpipe.distributed.group import SINGLE, Distributed, PeerFailed, join, launched, write_error_files

__all__ = ["SINGLE", "Distributed", "PeerFailed", "join", "launched", "write_error_files"]
