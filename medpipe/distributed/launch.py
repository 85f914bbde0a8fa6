"""``medpipe run FILE --nproc N``: N processes of the same command on this machine, through torch's own launcher.

This is ``torchrun --nnodes 1 --nproc-per-node N`` run in-process (``torch.distributed.launcher.api``, the
elastic agent torchrun itself uses), with what a one-machine run needs:

* the rendezvous on 127.0.0.1 at a free port, and gloo on the loopback interface (``GLOO_SOCKET_IFNAME``,
  unless set): nothing is contacted but this machine;
* no restarts: a failure ends the job (training resumes from its snapshot with ``--resume``);
* ``OMP_NUM_THREADS`` (unless set) the CPU cores divided by N, so the processes do not oversubscribe them;
* the job's error as one line: each failing rank writes its line into a folder the processes share
  (:func:`medpipe.distributed.group.write_error_files`), the agent stops the other processes, and
  :func:`launch` raises the first failure's line, naming its rank.

Multi-node runs use ``torchrun`` itself on every node (its rendezvous), with ``medpipe run FILE`` as the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from medpipe.distributed.group import ERRORS_ENV
from medpipe.errors import Interrupted, MedpipeError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_interface() -> str | None:
    """The name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS), or None when unknown."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block (the agent hands its environment to the processes)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(nproc: int, args: list[str]) -> None:
    """Run ``python -m medpipe.cli ARGS`` as ``nproc`` processes of one job; return when all succeeded.

    Raises:
        MedpipeError: a process failed; the message is the first failing rank's one line (``rank R: ...``).
        Interrupted: the job was interrupted (Ctrl-C).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    errors = Path(tempfile.mkdtemp(prefix="medpipe-ddp-"))
    env = {ERRORS_ENV: str(errors)}
    if "GLOO_SOCKET_IFNAME" not in os.environ and loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = loopback_interface() or ""
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"medpipe-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_configs={"rank": 0},
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # the agent's own lines (SIGTERM sent, ...): the job's line says it all
    try:
        with _environment(env):
            elastic_launch(config, sys.executable)("-m", "medpipe.cli", *args)
    except ChildFailedError as exc:
        raise _job_error(errors, exc) from None
    finally:
        agent_log.setLevel(level)
        shutil.rmtree(errors, ignore_errors=True)


def _job_error(errors: Path, exc: object) -> MedpipeError:
    """The first failure's line, from the ranks' error files, else from the agent's exit codes."""
    reports = []
    for path in errors.glob("rank*.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if reports:
        first = min(reports, key=lambda r: (r["time"], r["rank"]))
        if first.get("interrupted"):
            return Interrupted(first["message"], hint=first.get("hint"))
        return MedpipeError(f"rank {first['rank']}: {first['message']}", hint=first.get("hint"))
    failures = getattr(exc, "failures", {}) or {}
    if failures:
        rank, failure = min(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return MedpipeError(f"rank {rank} {how} without an error message",
                            hint="run again with --verbose, or look at the run's log")
    return MedpipeError(f"the distributed run failed ({type(exc).__name__})")
